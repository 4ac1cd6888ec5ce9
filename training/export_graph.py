"""Building the exported ONNX graph: freezing, tracing, simplifying, fp16 (checks: :mod:`training.export_checks`).

The graph contract (DESIGN.md, "The exported graph"): input ``image`` uint8 ``[N, H, W, C]`` with a
dynamic ``N``; scaling (/255) and the model's own normalisation inside the graph; outputs
``logits [N, K]``, ``probabilities [N, K]``, ``orientation_responses [N, K, G]`` and, on request,
``features [N, D, G]``.

Before tracing, every attention layer gets its group-expanded encoding table frozen (a constant
tensor, so the positional MLP and its weights are not in the graph) and a fixed query chunk size
(so that the graph does not depend on the dynamic batch size, and a chunk's score tensor stays
bounded at ``chunk_batch`` images). The CPU graph runs the network on one image at a time inside an
ONNX ``Scan`` (:class:`PerImageWrapper`), so its chunks hold one image's scores at any batch size.

Exporter: ``torch.onnx.export(..., dynamo=True, optimize=False)``. The exporter's own optimiser
(onnxscript's rewriter) is left out: its pattern matcher is super-linear in the graph size and took
~75 s on the chunk-unrolled RotMNIST R4 graph (1.8k nodes) on a 2-core machine, against ~7 s for
the constant folding, dead-code and common-subexpression passes below followed by onnxslim.
The TorchScript exporter is only a fallback when the dynamo exporter raises.

Axes: N batch, H W spatial, C channels, K classes, G group size, D feature channels.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import onnx
import torch
import torch.nn as nn

from training.lifting import LiftingSelfAttention
from training.networks import GSANet

__all__ = [
    "DEFAULT_OPSET",
    "CHUNK_BATCH",
    "CHUNK_SCORES",
    "OUTPUT_NAMES",
    "ExportParityError",
    "ExportWrapper",
    "GraphResult",
    "scores_per_query",
    "frozen_for_export",
    "build_graph",
    "to_fp16",
    "PerImageWrapper",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 20
# A chunk's scores are bounded by CHUNK_SCORES at CHUNK_BATCH images (256 MiB in float32). Every
# chunk is an unrolled copy of the attention ops in the graph, so the bound trades peak memory for
# graph size. Measured on gsa_rotmnist_r4, batch 64, ORT with 1 thread, shared 2-core machine:
# 2^22 -> 5.4k nodes, 459 s to export; 2^24 -> 1.4k nodes, 103 s, 8.4 s per batch, 1.2 GB peak;
# 2^26 -> 529 nodes, ~40 s, 8.7 s per batch, 1.7 GB peak.
CHUNK_BATCH = 64
CHUNK_SCORES = 1 << 26
OUTPUT_NAMES = ("logits", "probabilities", "orientation_responses")


class ExportParityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model (or the fp16 graph is unusable)."""


class ExportWrapper(nn.Module):
    """uint8 ``[N, H, W, C]`` in, the contract's outputs out (a tuple in ``output_names`` order)."""

    def __init__(self, model: GSANet, features: bool = False):
        super().__init__()
        self.model = model
        self.features = features
        self.training = False  # the wrapper only; the model's own mode is the caller's to set

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (("features",) if self.features else ())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # N, C, H, W in [0, 1]
        out = self.model.forward_all(x)
        logits = out["logits"]  # N, K
        result = (logits, torch.softmax(logits, dim=-1), out["orientation_responses"])  # N, K, G
        return result + ((out["features"],) if self.features else ())  # features: N, D, G


class PerImageWrapper(nn.Module):
    """:class:`ExportWrapper` applied to one image at a time inside a loop (an ONNX ``Scan``).

    The attention's chunks then hold the scores of one image, so they stay cache-sized and the
    graph's memory does not grow with the batch size; ONNX Runtime on CPU gains nothing from
    batching these many small GEMMs and elementwise passes (measured: per-image Scan 25 img/s
    against 17 img/s for the batched graph at batch 64, gsa_rotmnist_r4, 1 thread).
    """

    def __init__(self, inner: ExportWrapper):
        super().__init__()
        self.inner = inner
        self.training = False

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.inner.output_names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torch._higher_order_ops.scan import scan

        def body(carry: torch.Tensor, x: torch.Tensor):
            outs = self.inner(x.unsqueeze(0))  # one image: 1, ...
            return carry.clone(), tuple(o.squeeze(0).clone() for o in outs)  # no aliasing in a scan body

        _, ys = scan(body, torch.zeros((), device=image.device), image)  # ys: N, ... per output
        return tuple(ys)


def scores_per_query(layer: nn.Module) -> int:
    """Scores one query position holds per image and head (what ``WindowedAttention.attend`` bounds)."""
    g, p = layer.group.order, layer.num_offsets
    if isinstance(layer, LiftingSelfAttention):
        return g * p  # G, P
    return g * g * p * g if layer.form == "paper" else g * p * g  # (h~,) h, P, h'


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _mark_static(layer: nn.Module) -> None:
    """Mark the layer's constant tensors (gather indices, masks, frozen table) as fixed-size for dynamo.

    The per-image ``scan`` body is traced by dynamo, which lifts tensors held as plain attributes (the
    geometry cache, ``frozen_table``; unlike parameters and registered buffers) into graph inputs with
    symbolic, duck-sized shapes. Every chunk's ``index[start:stop]`` then had a ``Min``/``Max`` size,
    and the ``view(..., -1, ...)`` after it (``_gather``, ``attention_scores``) a floor-division guard
    that sympy simplified against all the guards before it: seconds per chunk, more as they piled up.
    The paper form's |H|^3 scores per query make D4 chunks 8x smaller than C4 ones (RotMNIST R4M:
    142 chunks, not done in 200 s). With static shapes the loop body has no symbols at all.
    """
    tensors = [layer.frozen_table] if layer.frozen_table is not None else []
    for index, bias, _, _ in layer._geometry.values():  # filled by a forward pass at the export size
        tensors += [index] + ([bias] if bias is not None else [])
    for t in tensors:
        torch._dynamo.mark_static(t)


@contextlib.contextmanager
def frozen_for_export(
    model: GSANet, chunk_batch: int = CHUNK_BATCH, chunk_scores: int = CHUNK_SCORES, freeze: bool = True
) -> Iterator[list[int]]:
    """Freeze every encoding table and fix every chunk size; restore both (and train mode) on exit.

    The frozen tables and the cached gather indices are marked static for tracing (:func:`_mark_static`).

    Yields:
        The chosen ``chunk_queries`` per attention layer.
    """
    layers = model.attention_layers()
    saved = [(layer.frozen_table, layer.chunk_queries) for layer in layers]
    with _eval_mode(model):
        try:
            chunks = []
            for layer in layers:
                if freeze:
                    with torch.no_grad():
                        layer.frozen_table = layer.encoding_table().detach().clone()
                _mark_static(layer)
                n = max(1, chunk_scores // (chunk_batch * layer.num_heads * scores_per_query(layer)))
                layer.chunk_queries = n
                chunks.append(n)
            yield chunks
        finally:
            for layer, (table, chunk) in zip(layers, saved):
                layer.frozen_table, layer.chunk_queries = table, chunk


@dataclass
class GraphResult:
    """An exported, checked and simplified graph and how it was made."""

    model: onnx.ModelProto
    exporter: str
    opset: int
    per_image: bool = False
    chunk_queries: list[int] = field(default_factory=list)
    simplifier: list[str] = field(default_factory=list)
    fallback_reason: str | None = None


def _sample_image(model: GSANet, batch: int, seed: int) -> torch.Tensor:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, cfg.img_size, cfg.img_size, cfg.in_chans), dtype=torch.uint8, generator=gen)


def _export_dynamo(wrapper: nn.Module, sample: torch.Tensor, opset: int, optimize: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from the exporter's dependencies
        program = torch.onnx.export(
            wrapper,
            (sample,),
            dynamo=True,
            optimize=False,
            opset_version=opset,
            input_names=["image"],
            output_names=list(wrapper.output_names),
            dynamic_shapes={"image": {0: torch.export.Dim("N")}},
            verbose=False,
        )
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    graph = program.model  # an onnx_ir.Model
    if not optimize:
        return ir.serde.serialize_model(graph)
    ir.passes.Sequential(common.InlinePass(), common.RemoveUnusedNodesPass())(graph)
    for _ in range(2):
        fold_constants(graph, onnx_shape_inference=True)
        common.RemoveUnusedNodesPass()(graph)
    ir.passes.Sequential(
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
    )(graph)
    return ir.serde.serialize_model(graph)


def _export_torchscript(wrapper: ExportWrapper, sample: torch.Tensor, opset: int) -> onnx.ModelProto:
    import io

    names = list(wrapper.output_names)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (sample,), buf, dynamo=False, opset_version=opset, input_names=["image"],
            output_names=names, dynamic_axes={n: {0: "N"} for n in ["image", *names]},
        )
    return onnx.load_from_string(buf.getvalue())


def _simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    try:
        import onnxslim
    except ImportError:  # optional: the IR passes already folded constants and removed dead code
        return proto, []
    return onnxslim.slim(proto), [f"onnxslim {onnxslim.__version__}"]


def build_graph(
    model: GSANet,
    features: bool = False,
    opset: int = DEFAULT_OPSET,
    chunk_batch: int = CHUNK_BATCH,
    chunk_scores: int = CHUNK_SCORES,
    freeze: bool = True,
    simplify: bool = True,
    exporter: str = "dynamo",
    per_image: bool = True,
) -> GraphResult:
    """Export ``model`` to a checked ONNX graph (encodings frozen, chunks fixed, simplified).

    Args:
        model: the network; its state is restored afterwards.
        features: also output ``features``.
        opset: ONNX opset.
        chunk_batch, chunk_scores: a chunk holds at most ``chunk_scores`` scores at ``chunk_batch`` images.
        freeze: freeze the encoding tables (False only to prove that the graph inspection can fail).
        simplify: fold constants, remove dead code and run onnxslim (False: the exporter's raw graph).
        exporter: ``"dynamo"`` (falls back to ``"torchscript"`` if it raises) or ``"torchscript"``.
        per_image: loop over the images of a batch inside the graph (:class:`PerImageWrapper`; the
            CPU graph); False: one batched graph (the fp16 GPU graph). A chunk then holds at most
            ``chunk_scores / chunk_batch`` scores per image whatever the batch size. If the loop
            cannot be exported the batched graph is used, and the reason kept.
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    wrapper = ExportWrapper(model, features)
    sample = _sample_image(model, 2, seed=0)
    with _eval_mode(model), torch.no_grad():
        wrapper(sample[:1])  # fills each layer's geometry cache with concrete index tensors
    with frozen_for_export(model, chunk_batch, chunk_scores, freeze) as chunks, torch.no_grad():
        fallback_reason = None
        if exporter == "dynamo" and per_image:
            try:
                proto = _export_dynamo(PerImageWrapper(wrapper), sample, opset, optimize=simplify)
            except Exception as exc:  # noqa: BLE001 - any exporter failure falls back, with the reason kept
                fallback_reason = f"per-image loop: {type(exc).__name__}: {_first_line(exc)}"
                logger.warning("per-image export failed (%s); exporting the batched graph", fallback_reason)
                per_image = False
        if exporter == "dynamo" and not per_image:
            try:
                proto = _export_dynamo(wrapper, sample, opset, optimize=simplify)
            except Exception as exc:  # noqa: BLE001
                fallback_reason = f"dynamo: {type(exc).__name__}: {_first_line(exc)}"
                logger.warning("dynamo exporter failed (%s); falling back to the TorchScript exporter", fallback_reason)
                exporter = "torchscript"
        if exporter == "torchscript":
            per_image = False
            proto = _export_torchscript(wrapper, sample, opset)
    passes = ["fold_constants", "remove_unused", "cse"] if exporter == "dynamo" and simplify else []
    if simplify:
        proto, slim = _simplify(proto)
        passes += slim
    onnx.checker.check_model(proto, full_check=True)
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return GraphResult(proto, f"torch.onnx {exporter}", opset_used, per_image, chunks, passes, fallback_reason)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations; ``image`` stays uint8 and the outputs stay float32.

    Uses the converter shipped inside onnxruntime (``onnxruntime.transformers.float16``). The -inf
    mask of out-of-image keys is clipped to -65504, still a zero weight after the softmax.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    onnx.checker.check_model(half, full_check=True)
    return half

