"""The committed graphs on ONNX Runtime's CUDA execution provider: the fp32 graph matches the
checkpoint to 1e-4 like on the CPU, the fp16 graph agrees with it, both stay equivariant, and the
heavy operators really run on the GPU.

These tests need onnxruntime-gpu and a CUDA device; everywhere else they are skipped. Run them on a
GPU machine with ``python -m pytest tests/training/test_gpu_onnx.py`` (``GSA_TEST_DATA`` names the
data folder when ``../shared/data`` is not beside the checkout; see ``tests/data_paths.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_paths import MNIST, require

try:  # the CUDA libraries that PyTorch loaded serve onnxruntime-gpu too
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
except ImportError:  # pragma: no cover - the training extra installs onnxruntime
    ort = None

from training.checkpoint import load_model
from training.data import build_dataset
from training.equivariance import act_on_group_signal, act_on_spatial, relative_error

ROOT = Path(__file__).resolve().parents[2]
# The greyscale (RotMNIST) graphs, checked on real digits; the RGB pathology graphs are not run here (not yet
# checked on a GPU: no device was lent when they were added).
MODELS = sorted(p for p in (ROOT / "models").glob("*/*") if (p / "model.fp16.onnx").is_file()
                and json.loads((p / "card.json").read_text())["input"]["channels"] == 1)
CUDA = "CUDAExecutionProvider"
# TF32 matrix products are asked off for the fp32 graph: the contract's parity is 1e-4.
CUDA_FP32 = (CUDA, {"use_tf32": "0"})
HEAVY_OPS = {"MatMul", "Gemm", "Einsum", "Softmax", "Conv", "LayerNormalization", "Gather", "GatherElements"}
FP16_LOGIT_TOL = 5e-2  # bounds; the measured figures are in docs/benchmarks.md (bench_onnx_gpu.py)
FP16_EQUIVARIANCE_TOL = 2e-3  # measured 8.1e-4 to 8.7e-4 on the H200 (bench_onnx_gpu.py, 32 digits)

pytestmark = pytest.mark.skipif(
    ort is None or CUDA not in ort.get_available_providers() or not torch.cuda.is_available(),
    reason="needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA device",
)


@pytest.fixture(scope="module")
def digits():
    mnist = require(MNIST)
    options = {"val_size": 1000, "split_seed": 0, "rotate": True, "rotation_seed": 0}
    val = build_dataset("mnist", mnist, "val", **options)
    x = torch.stack([val[i][0] for i in range(256)])
    y = torch.tensor([int(val[i][1]) for i in range(256)])
    return (x * 255).round().to(torch.uint8), y  # uint8 pixels, as a client sends them


def _session(graph: Path, provider, profile: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    session = ort.InferenceSession(str(graph), sess_options=options, providers=[provider, "CPUExecutionProvider"])
    assert session.get_providers()[0] == CUDA, session.get_providers()
    return session


def _placement(session: ort.InferenceSession, image: np.ndarray) -> Counter:
    """(op type, provider) of every node that ran, from ONNX Runtime's profile."""
    session.run(None, {"image": image})
    events = json.loads(Path(session.end_profiling()).read_text())
    return Counter((e["args"]["op_name"], e["args"]["provider"]) for e in events
                   if e.get("cat") == "Node" and "provider" in e.get("args", {}) and e["name"].endswith("_kernel_time"))


def _nhwc(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


@pytest.mark.parametrize("version", MODELS, ids=[f"{p.parent.name}/{p.name}" for p in MODELS])
def test_graphs_on_cuda_match_the_checkpoint_and_each_other(version, digits, tmp_path):
    pixels, labels = digits
    model, _ = load_model(version / "checkpoint_best.pt", map_location="cpu")
    model.eval()
    with torch.no_grad():
        ref = model.forward_all(pixels.float() / 255)
    image = _nhwc(pixels)
    fp32 = _session(version / "model.onnx", CUDA_FP32, profile=tmp_path / "fp32")
    fp16 = _session(version / "model.fp16.onnx", CUDA, profile=tmp_path / "fp16")
    names = ["logits", "probabilities", "orientation_responses"]
    l32, p32, r32 = fp32.run(names, {"image": image})
    l16, p16, r16 = fp16.run(names, {"image": image})
    assert l16.dtype == np.float32 and r16.dtype == np.float32  # the contract's types, fp16 inside
    assert np.abs(l32 - ref["logits"].numpy()).max() <= 1e-4
    assert np.abs(r32 - ref["orientation_responses"].numpy()).max() <= 1e-4
    assert np.abs(l16 - l32).max() <= FP16_LOGIT_TOL
    assert (l16.argmax(1) == l32.argmax(1)).mean() >= 0.99
    assert abs((l16.argmax(1) == labels.numpy()).mean() - (l32.argmax(1) == labels.numpy()).mean()) <= 0.01
    # The heavy operators ran on the GPU (shape arithmetic may stay on the CPU by design).
    for session in (fp32, fp16):
        placed = _placement(session, image[:8])
        on_cpu = sorted({op for (op, provider), _ in placed.items() if op in HEAVY_OPS and provider != CUDA})
        assert not on_cpu, f"{on_cpu} ran on the CPU: {placed}"
        assert sum(n for (op, provider), n in placed.items() if provider == CUDA) > 0


@pytest.mark.parametrize("version", MODELS, ids=[f"{p.parent.name}/{p.name}" for p in MODELS])
def test_graphs_on_cuda_are_equivariant(version, digits):
    pixels, _ = digits
    pixels = pixels[:32]
    card = json.loads((version / "card.json").read_text())
    model, _ = load_model(version / "checkpoint_best.pt", map_location="cpu")
    group = model.group
    elements = [e for e in range(group.order) if group.is_grid_exact(e) and e != 0]
    if not elements:
        pytest.skip(f"{card['group']['name']} has no grid-exact element but the identity")
    for graph, provider, tol in (("model.onnx", CUDA_FP32, 1e-5), ("model.fp16.onnx", CUDA, FP16_EQUIVARIANCE_TOL)):
        session = _session(version / graph, provider)
        logits, responses = session.run(["logits", "orientation_responses"], {"image": _nhwc(pixels)})
        for e in elements:
            turned = _nhwc(act_on_spatial(pixels, group, e, (2, 3)))
            logits_e, responses_e = session.run(["logits", "orientation_responses"], {"image": turned})
            expected = act_on_group_signal(torch.from_numpy(responses), group, e, None, 2)
            assert relative_error(torch.from_numpy(logits_e), torch.from_numpy(logits)) <= tol, (graph, e)
            assert relative_error(torch.from_numpy(responses_e), expected) <= tol, (graph, e)
