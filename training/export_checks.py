"""Checks of an exported graph: ONNX Runtime against PyTorch, and no positional-encoding MLP left.

Axes: N batch, K classes, G group size.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
import torch
import torch.nn as nn

from gsa_contract import INPUT_NAME
from training.export_graph import ExportParityError, ExportWrapper, _eval_mode, _sample_image
from training.networks import GSANet

__all__ = ["run_onnx", "check_parity", "find_encoding_mlp", "iter_graphs"]


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes (Scan, Loop, If bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def run_onnx(proto_or_bytes: onnx.ModelProto | bytes, image: np.ndarray, threads: int = 1) -> dict[str, np.ndarray]:
    """Run a graph on CPU with ONNX Runtime; returns outputs by name."""
    import onnxruntime as ort

    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: image})))


def check_parity(
    proto: onnx.ModelProto, model: GSANet, features: bool = False, batch: int = 3, atol: float = 1e-4, seed: int = 0
) -> dict[str, float]:
    """ONNX Runtime against PyTorch on the same random images; raise if any output differs by > ``atol``.

    Returns:
        Max abs difference per output.
    """
    image = _sample_image(model, batch, seed=seed)
    wrapper = ExportWrapper(model, features)
    with _eval_mode(model), torch.no_grad():  # the model as trained: encodings from the MLP, its own chunking
        ref = dict(zip(wrapper.output_names, (t.numpy() for t in wrapper(image))))
    got = run_onnx(proto, image.numpy())
    missing = set(ref) - set(got)
    if missing:
        raise ExportParityError(f"the ONNX graph lacks outputs {sorted(missing)}")
    diffs = {k: float(np.abs(got[k].astype(np.float64) - ref[k]).max()) for k in ref}
    bad = {k: d for k, d in diffs.items() if not d <= atol}  # `not <=` also catches NaN
    if bad:
        raise ExportParityError(
            f"ONNX Runtime disagrees with PyTorch on {batch} random images: max abs diff {bad} > {atol:g}; "
            "the graph was not written"
        )
    return diffs


def find_encoding_mlp(proto: onnx.ModelProto, model: GSANet) -> list[str]:
    """Evidence that a positional-encoding MLP is still in ``proto`` (empty list: none found).

    Two independent checks:
      * weights: every parameter of every ``pos_enc`` MLP (the group embedding excluded: its rows are
        legitimately copied into the frozen table) with at least two distinct values is looked up in
        the initializers, by value and irrespective of layout (a transposed or reshaped copy is found);
      * operators: the graph must not have more ``LayerNormalization`` nodes than the model has
        LayerNorms outside the encodings (each MLP adds one).
    """
    from onnx import numpy_helper

    graphs = list(iter_graphs(proto.graph))
    init_values = [
        set(np.asarray(numpy_helper.to_array(t), dtype=np.float32).ravel().tolist())
        for g in graphs
        for t in g.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    ]
    for node in (n for g in graphs for n in g.node):  # Constant nodes hold weights too when not lifted
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                    init_values.append(set(numpy_helper.to_array(attr.t).astype(np.float32).ravel().tolist()))
    evidence = []
    for i, layer in enumerate(model.attention_layers()):
        for pname, module in layer.pos_enc.named_modules():
            if isinstance(module, nn.Embedding):
                continue
            for wname, param in module.named_parameters(recurse=False):
                values = set(param.detach().to(torch.float32).reshape(-1).tolist())
                if len(values) < 2:
                    continue
                if any(values <= vals for vals in init_values):
                    evidence.append(f"layer {i} pos_enc.{pname}.{wname} is an initializer of the graph")
    in_encodings = {id(m) for layer in model.attention_layers() for m in layer.pos_enc.modules()}
    expected_norms = sum(1 for m in model.modules() if isinstance(m, nn.LayerNorm) and id(m) not in in_encodings)
    found_norms = sum(1 for g in graphs for n in g.node if n.op_type == "LayerNormalization")
    if found_norms > expected_norms:
        evidence.append(f"{found_norms} LayerNormalization nodes, the model has {expected_norms} outside the encodings")
    return evidence
