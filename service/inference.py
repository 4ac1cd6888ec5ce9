"""ONNX Runtime sessions for exported GSA-Nets (no FastAPI here).

The graph contract is :mod:`gsa_contract`'s; :class:`OnnxModel` checks a graph against its card
before serving it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gsa_contract import FEATURES, INPUT_NAME, LOGITS, OPTIONAL_OUTPUTS, ORIENTATION_RESPONSES, PROBABILITIES, REQUIRED_OUTPUTS, ModelCard

__all__ = ["GraphError", "TensorSpec", "OnnxModel", "choose_providers", "provider_options"]

log = logging.getLogger(__name__)


# ONNX Runtime type strings -> (numpy dtype, Open Inference Protocol datatype)
_ORT_TYPES = {
    "tensor(uint8)": (np.uint8, "UINT8"),
    "tensor(int8)": (np.int8, "INT8"),
    "tensor(int32)": (np.int32, "INT32"),
    "tensor(int64)": (np.int64, "INT64"),
    "tensor(float16)": (np.float16, "FP16"),
    "tensor(float)": (np.float32, "FP32"),
    "tensor(double)": (np.float64, "FP64"),
    "tensor(bool)": (np.bool_, "BOOL"),
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")


class GraphError(ValueError):
    """An ONNX graph that does not follow the contract or disagrees with its card."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the protocol describes it (``-1``: dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def choose_providers(device: str, explicit: list[str] | None, available: list[str]) -> list[str]:
    """Execution providers to ask for, best first: an explicit list, else CUDA (when allowed and
    available) then CPU."""
    if explicit:
        unknown = [p for p in explicit if p not in available]
        if unknown:
            log.warning("execution providers %s are not available (available: %s)", unknown, available)
        chosen = [p for p in explicit if p in available]
        return chosen or ["CPUExecutionProvider"]
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device in ("auto", "cuda") else ["CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def provider_options(providers: list[str], cuda_tf32: bool = False) -> list[str | tuple[str, dict[str, str]]]:
    """The providers with the options the service sets explicitly: CUDA's TF32 switch (ONNX
    Runtime's default has changed between releases; off keeps the fp32 graph within 1e-4 of the
    checkpoint)."""
    return [(p, {"use_tf32": "1" if cuda_tf32 else "0"}) if p == "CUDAExecutionProvider" else p for p in providers]


def gpu_requested(device: str, explicit: list[str] | None) -> bool:
    return device == "cuda" or bool(explicit and any(p in _GPU_PROVIDERS for p in explicit))


class OnnxModel:
    """One ONNX Runtime session with the graph checked against the card.

    Args:
        path: the ``.onnx`` file.
        card: its model card.
        providers: execution providers to ask for, best first (names, or ``(name, options)``).
        intra_op_threads: threads inside one operator (0: ONNX Runtime's default).
        inter_op_threads: threads across operators (0: default).
        allow_spinning: whether idle intra-op threads spin-wait for work (ONNX Runtime's default)
            or sleep, leaving the cores to the HTTP server.
    """

    def __init__(
        self,
        path: Path,
        card: ModelCard,
        providers: list[str | tuple[str, dict[str, str]]],
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        allow_spinning: bool = True,
    ):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not our JSON logs
        self.path = path
        self.card = card
        self.warmup_seconds_per_image = 0.0  # measured by the graph check, then by warmup()
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.providers: list[str] = list(self.session.get_providers())
        self.input, outputs = self._check_graph()
        self.output_names = [o.name for o in outputs]
        self.outputs = self._check_run(outputs)

    @property
    def on_gpu(self) -> bool:
        return any(p in _GPU_PROVIDERS for p in self.providers)

    def _check_graph(self) -> tuple[TensorSpec, list[TensorSpec]]:
        card = self.card
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise GraphError(f"graph inputs are {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
        spec = _spec(inputs[0])
        expected = (-1, card.height, card.width, card.channels)
        if spec.datatype != "UINT8" or len(spec.shape) != 4 or spec.shape[1:] != expected[1:]:
            raise GraphError(f"graph input is {spec.datatype} {list(spec.shape)}, card says UINT8 {list(expected)}")
        outputs = {o.name: _spec(o) for o in self.session.get_outputs()}
        missing = [n for n in REQUIRED_OUTPUTS if n not in outputs]
        if missing:
            raise GraphError(f"graph lacks outputs {missing}")
        k, g = card.num_classes, card.group_order
        want = {LOGITS: (k,), PROBABILITIES: (k,), ORIENTATION_RESPONSES: (k, g)}
        for name, tail in want.items():
            shape = outputs[name].shape
            if len(shape) != len(tail) + 1 or any(s != -1 and s != t for s, t in zip(shape[1:], tail)):
                raise GraphError(f"graph output '{name}' has shape {list(shape)}, card implies [N, {', '.join(map(str, tail))}]")
        names = [n for n in (*REQUIRED_OUTPUTS, *OPTIONAL_OUTPUTS) if n in outputs]
        return TensorSpec(INPUT_NAME, "UINT8", expected), [outputs[n] for n in names]

    def _check_run(self, outputs: list[TensorSpec]) -> list[TensorSpec]:
        """Run one blank image: the concrete output shapes must match the card (a graph may leave
        the group axis dynamic), and the outputs must be finite. Returns the specs with every
        non-batch dimension filled in."""
        card = self.card
        t0 = time.perf_counter()
        got = self.run(np.zeros((1, card.height, card.width, card.channels), np.uint8))
        self.warmup_seconds_per_image = time.perf_counter() - t0  # a first run: an upper bound
        k, g = card.num_classes, card.group_order
        want = {LOGITS: (1, k), PROBABILITIES: (1, k), ORIENTATION_RESPONSES: (1, k, g)}
        for name, shape in want.items():
            if got[name].shape != shape:
                raise GraphError(f"graph output '{name}' has shape {list(got[name].shape)} for one image, card implies {list(shape)}")
        d = card.feature_dim
        if FEATURES in got:
            shape = got[FEATURES].shape
            if len(shape) != 3 or shape[2] != g or (d is not None and shape[1] != d):
                raise GraphError(f"graph output '{FEATURES}' has shape {list(shape)}, card implies [1, {d or 'D'}, {g}]")
        elif d is not None:
            raise GraphError(f"card lists a '{FEATURES}' output [N, {d}, {g}] that the graph lacks")
        bad = [name for name, value in got.items() if not np.isfinite(value).all()]
        if bad:
            raise GraphError(f"graph outputs {bad} are not finite for a blank image")
        return [TensorSpec(o.name, o.datatype, (-1, *got[o.name].shape[1:])) for o in outputs]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``images`` uint8 ``[N, H, W, C]`` -> every contract output, batch first."""
        values = self.session.run(self.output_names, {INPUT_NAME: images})
        return dict(zip(self.output_names, values))

    def warmup(self, batch_sizes: list[int]) -> float:
        """Run once per batch size so that the first real request pays no allocation cost.

        Returns:
            Seconds per image of the run at the largest batch size (a first run: an upper bound).
        """
        card = self.card
        per_image = self.warmup_seconds_per_image
        for n in sorted(set(batch_sizes)):
            t0 = time.perf_counter()
            self.run(np.zeros((n, card.height, card.width, card.channels), np.uint8))
            per_image = (time.perf_counter() - t0) / n
        self.warmup_seconds_per_image = per_image
        return per_image


def _spec(node) -> TensorSpec:
    if node.type not in _ORT_TYPES:
        raise GraphError(f"tensor '{node.name}' has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, _ORT_TYPES[node.type][1], shape)
