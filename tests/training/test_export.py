"""ONNX export: parity for every registered network, equivariance of the exported graph, the frozen
encodings (with a negative control), fp16, the repository layout and the error paths.

Each network is exported once per session (``_exported``) and shared by the parity and equivariance
tests. A dynamo export costs ~0.03 s of CPU per graph node (symbolic batch size), 5-30 s per network
here, so to keep the file within a few minutes on 2 cores:

* graphs made for the parity tests size their query chunks for the test batch (``chunk_batch=2``:
  the same chunk code, fewer unrolled copies of it); the shipped chunking (batch 64) is exercised by
  the ``export_model`` tests on the tiny net;
* the heaviest networks run at a smaller input size (``SIZES``: CIFAR R4M/R8 at 16, R12/R16 at 8;
  PCam at 64, R12/R16 at 56, the smallest size their crops and pools allow);
* every group is covered by the default run through the RotMNIST family up to R8, plus CIFAR R4 and
  PCam R4M; the other networks (R12, R16 and the remaining CIFAR and PCam variants) are marked
  ``slow`` (``-m "not slow"`` leaves them out; CI runs them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from training.checkpoint import save_checkpoint
from training.equivariance import act_on_group_signal, act_on_spatial, relative_error
from gsa_contract import CARD_FILE, FP16_FILE, GRAPH_FILE, ModelCard
from training.export import PCAM_MPP, export_model, main
from training.export_checks import check_parity, find_encoding_mlp, iter_graphs, run_onnx
from training.export_graph import ExportParityError, GraphResult, build_graph
from training.networks import create_model, list_models

SIZES = {
    "gsa_cifar10_r4m": 16, "gsa_cifar10_r8": 16, "gsa_cifar10_r12": 8, "gsa_cifar10_r16": 8,
    **{f"gsa_cifar10_{g}": 16 for g in ("z2", "z2m", "r4")},
    **{f"gsa_pcam_{g}": 64 for g in ("z2", "z2m", "r4", "r4m", "r8")},
    "gsa_pcam_r12": 56, "gsa_pcam_r16": 56,
    # pooled 2x2 inside the net: 16x16 positions; the same layers as at the shipped 96x96, fewer positions
    **{f"gsa_pcam48_{g}": 32 for g in ("z2", "z2m", "r4", "r4m", "r8", "r12", "r16")},
}
FAST = {
    "gsa_tiny_r4", "gsa_rotmnist_z2", "gsa_rotmnist_z2m", "gsa_rotmnist_r4", "gsa_rotmnist_r4m", "gsa_rotmnist_r8",
    "gsa_cifar10_r4", "gsa_pcam_r4m",
}
BATCH = 2


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared 2-core machine, multi-threaded small ops mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    size = SIZES.get(name)
    return create_model(name, **({"img_size": size} if size else {})).eval()


_CACHE: dict[str, tuple[nn.Module, GraphResult]] = {}


def _exported(name: str) -> tuple[nn.Module, onnx.ModelProto]:
    if name not in _CACHE:
        model = _model(name)
        _CACHE[name] = (model, build_graph(model, chunk_batch=BATCH))
    model, result = _CACHE[name]
    return model, result.model


def _images(model: nn.Module, n: int, seed: int) -> np.ndarray:
    cfg = model.config
    return np.random.default_rng(seed).integers(0, 256, (n, cfg.img_size, cfg.img_size, cfg.in_chans), dtype=np.uint8)


# ---- parity and equivariance ------------------------------------------------------------------
# Every group on one family (RotMNIST: Z2, Z2M, R4, R4M, R8, R12, R16) and every family on one
# group (CIFAR10, PCam, PCam48 with its in-net pooling, the tiny test net): the registered networks
# differ only in these and in widths, and each export costs 10-30 s of CPU here (all 29 took about
# 8 minutes of a loaded CI run)
PARITY = list_models("gsa_rotmnist_") + ["gsa_cifar10_r4", "gsa_pcam_r4m", "gsa_pcam48_r4m", "gsa_tiny_r4"]


def test_parity_covers_every_group_and_family():
    groups = {name.rsplit("_", 1)[1] for name in list_models()}
    families = {name.rsplit("_", 1)[0] for name in list_models()}
    assert {n.rsplit("_", 1)[1] for n in PARITY} == groups and {n.rsplit("_", 1)[0] for n in PARITY} == families


@pytest.mark.parametrize("name", _params(PARITY))
def test_parity_every_group_and_family(name):
    model, proto = _exported(name)
    diffs = check_parity(proto, model, batch=BATCH, atol=1e-4, seed=1)
    assert diffs["logits"] <= 1e-4
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "orientation_responses"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [model.config.img_size] * 2 + [model.config.in_chans]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


@pytest.mark.parametrize("name", _params(list_models("gsa_rotmnist_") + ["gsa_pcam_r4m"]))
def test_exported_graph_is_equivariant(name):
    """Rotating/mirroring the uint8 input by a grid-exact element permutes the orientation responses
    along the group axis and leaves logits unchanged, in ONNX Runtime."""
    model, proto = _exported(name)
    group = model.group
    image = _images(model, 1, seed=2)
    base = run_onnx(proto, image)
    for g in group.grid_exact_elements():
        moved = act_on_spatial(torch.from_numpy(image), group, g, dims=(1, 2)).contiguous().numpy()
        out = run_onnx(proto, moved)
        expected = act_on_group_signal(torch.from_numpy(base["orientation_responses"]), group, g, None, group_dim=2)
        assert relative_error(torch.from_numpy(out["orientation_responses"]), expected) <= 1e-5, f"element {g}"
        assert relative_error(torch.from_numpy(out["logits"]), torch.from_numpy(base["logits"])) <= 1e-5, f"element {g}"


def test_equivariance_check_can_fail():
    """The check above must notice a wrong permutation: responses of a rotated image are not the
    unpermuted ones (random weights break the symmetry)."""
    model, proto = _exported("gsa_rotmnist_r4")
    image = _images(model, BATCH, seed=2)
    base = run_onnx(proto, image)["orientation_responses"]
    moved = act_on_spatial(torch.from_numpy(image), model.group, 1, dims=(1, 2)).contiguous().numpy()
    out = run_onnx(proto, moved)["orientation_responses"]
    assert relative_error(torch.from_numpy(out), torch.from_numpy(base)) > 1e-3


def test_dynamic_batch():
    model, proto = _exported("gsa_tiny_r4")
    for n in (1, 5):
        out = run_onnx(proto, _images(model, n, seed=n))
        assert out["logits"].shape == (n, 10) and out["orientation_responses"].shape == (n, 10, 4)
        np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)


# ---- export time: many chunks in the per-image loop ---------------------------------------------
MIRROR_EXPORT_CPU_S = 60  # the net below, measured (whole process): 28 s of CPU with static shapes, 127 s without


class _CpuTimeExceeded(BaseException):
    """Not an ``Exception``: the exporter and dynamo catch those (and fall back or carry on)."""


@contextlib.contextmanager
def _cpu_time_limit(seconds: float):
    """Fail once the process has used ``seconds`` of CPU time from here (user and system, all
    threads): a bound that a loaded machine does not tighten, unlike a wall-clock one. The timer
    fires again every second until the block is left."""
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs POSIX interval timers")

    def expire(signum, frame):
        raise _CpuTimeExceeded

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds, 1.0)
    try:
        yield
    except _CpuTimeExceeded:
        signal.setitimer(signal.ITIMER_PROF, 0)
        pytest.fail(f"used more than {seconds:.0f} s of CPU time")
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def test_mirror_group_export_is_bounded(tmp_path):
    """A D4 (R4M) net through the real exporter, shipped chunking, ``features`` on, in bounded time.

    The paper form holds |H|^3 P scores per query, so the shipped chunk bound cuts this 20x20 D4
    layer into 45 chunks of 9 queries. Dynamo traced the loop body's constant tensors (gather
    indices, frozen tables) with symbolic sizes, and every chunk's slice and ``view(..., -1, ...)``
    added floor-division guards for sympy to simplify against the ones before: this export took
    4.5 times the CPU time it takes with static shapes (``gsa_rotmnist_r4m``, 142 chunks, did not
    finish in 200 s). ``frozen_for_export`` marks them static.
    """
    torch.manual_seed(0)
    model = create_model("gsa_rotmnist_r4m", img_size=20, block_sizes=(1,), crops=(0,), expansion=(1,), dim=8)
    with _cpu_time_limit(MIRROR_EXPORT_CPU_S):
        path = export_model(model.eval(), tmp_path, "r4m", 1, features=True, command="pytest")
    card = json.loads((path.parent / CARD_FILE).read_text())
    assert card["export"]["graph_layout"].startswith("per-image") and card["export"]["fallback_reason"] is None
    assert card["export"]["chunk_queries"][1] == 9, "the group layer is cut into many chunks"
    assert card["outputs"]["features"] == ["N", 8, 8]
    diffs = check_parity(onnx.load(path), model, features=True, batch=BATCH, atol=1e-4, seed=7)
    assert max(diffs.values()) <= 1e-4


# ---- export_model: the written version --------------------------------------------------------
def _distinct_weights(model: nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm ones and zeros included), so that values identify weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The tiny net, distinct random weights, exported with fp16 and features (shipped chunking)."""
    model = create_model("gsa_tiny_r4")
    _distinct_weights(model, seed=3)
    model.train()
    root = tmp_path_factory.mktemp("repo")
    path = export_model(model, root, "tiny", 3, fp16=True, features=True, mpp=PCAM_MPP, command="pytest")
    return model, root, path


def test_export_model_writes_version(written):
    model, root, path = written
    assert model.training, "the model's mode is restored"
    assert all(layer.frozen_table is None and layer.chunk_queries is None for layer in model.attention_layers())
    folder = root / "tiny" / "3"
    assert path == folder / GRAPH_FILE
    assert sorted(os.listdir(root / "tiny")) == ["3"], "no temporary folder left behind"
    assert sorted(os.listdir(folder)) == sorted([CARD_FILE, GRAPH_FILE, FP16_FILE])
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["fp16_file"] == FP16_FILE
    assert card["fp16_sha256"] == hashlib.sha256((folder / FP16_FILE).read_bytes()).hexdigest()
    assert card["name"] == "tiny" and card["version"] == "3" and card["task"] == "classification"
    assert card["labels"] == [str(i) for i in range(10)] and card["mpp"] == PCAM_MPP
    assert card["patch_um"] == [round(16 * PCAM_MPP, 3)] * 2  # the 16-pixel input's side in micrometres
    assert card["input"] == {**card["input"], "dtype": "uint8", "layout": "NHWC", "height": 16, "width": 16, "channels": 1}
    elements = [(e["angle"], e["reflection"]) for e in card["group"]["elements"]]
    assert card["group"]["name"] == "R4" and elements == [(0.0, False), (90.0, False), (180.0, False), (270.0, False)]
    assert card["opset"] == onnx.load(path).opset_import[0].version
    assert card["export"]["parity"]["max_abs_diff"]["logits"] <= 1e-4
    assert {"torch", "onnx", "onnxruntime"} <= set(card["versions"]) and card["command"] == "pytest"
    assert card["outputs"]["features"] == ["N", model.num_features, 4]
    assert card["export"]["graph_layout"].startswith("per-image") and card["export"]["fp16_graph_layout"] == "batched"
    assert ModelCard.from_dict(card).fp16_file == FP16_FILE


def test_fp16_graph(written):
    """Loads in ONNX Runtime on CPU, uint8 in and float32 out, close to the fp32 graph."""
    model, root, path = written
    image = _images(model, 3, seed=4)
    fp32 = run_onnx(path.read_bytes(), image)
    fp16 = run_onnx((path.parent / FP16_FILE).read_bytes(), image)
    assert set(fp16) == {"logits", "probabilities", "orientation_responses", "features"}
    assert all(v.dtype == np.float32 for v in fp16.values())
    assert np.abs(fp16["probabilities"] - fp32["probabilities"]).max() <= 1e-2
    assert (fp16["logits"].argmax(-1) == fp32["logits"].argmax(-1)).all()
    graph = onnx.load(path.parent / FP16_FILE)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)


def _table_in_graph(proto: onnx.ModelProto, table: torch.Tensor) -> bool:
    values = set(table.reshape(-1).tolist())
    inits = (
        set(onnx.numpy_helper.to_array(t).astype(np.float32).ravel().tolist())
        for g in iter_graphs(proto.graph) for t in g.initializer
    )
    return any(values <= v for v in inits)


def test_graph_has_no_encoding_mlp(written):
    model, _, path = written
    proto = onnx.load(path)
    assert find_encoding_mlp(proto, model) == []
    # The frozen tables themselves are constants of the graph (the value search does find tensors).
    with torch.no_grad():
        assert all(_table_in_graph(proto, layer.encoding_table()) for layer in model.attention_layers())
    in_encodings = {id(m) for layer in model.attention_layers() for m in layer.pos_enc.modules()}
    norms = sum(isinstance(m, nn.LayerNorm) and id(m) not in in_encodings for m in model.modules())
    assert sum(n.op_type == "LayerNormalization" for g in iter_graphs(proto.graph) for n in g.node) == norms

    # Negative control: the same model exported without freezing keeps its MLP, and the check says so.
    raw = build_graph(model, freeze=False, simplify=False).model
    evidence = find_encoding_mlp(raw, model)
    assert any("pos_enc" in e for e in evidence) and any("LayerNormalization" in e for e in evidence), evidence


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    """A graph that does not reproduce the model (here: traced from other weights) is refused."""
    import training.export as export_module

    _, other = _exported("gsa_tiny_r4")  # seed-0 weights
    model = create_model("gsa_tiny_r4")
    _distinct_weights(model, seed=5)
    monkeypatch.setattr(export_module, "build_graph", lambda *a, **k: _CACHE["gsa_tiny_r4"][1])
    with pytest.raises(ExportParityError, match="disagrees with PyTorch"):
        export_model(model, tmp_path, "tiny", "1")
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "nothing may be written"


# ---- command line -----------------------------------------------------------------------------
def _checkpoint(path: Path, model: nn.Module) -> Path:
    return save_checkpoint(path, {
        "model_name": model.name, "model_config": dataclasses.asdict(model.config),
        "model_state": model.state_dict(), "epoch": 3, "global_step": 30,
        "best": {"epoch": 2, "val_acc": 0.91, "val_loss": 0.3},
        "history": [{"epoch": 2, "val_acc": 0.91, "time_s": 10.25, "device": "cpu: 2 threads"},
                    {"epoch": 3, "val_acc": 0.9, "time_s": 20.0, "device": "cuda: NVIDIA H100"}],
        "train_config": {"data": {"name": "mnist", "root": "mnist.npz"}},
    })


def test_cli_exports_refuses_and_forces(tmp_path, capsys):
    torch.manual_seed(6)
    ckpt = _checkpoint(tmp_path / "ckpt.pt", create_model("gsa_tiny_r4"))
    out = tmp_path / "models"
    argv = ["--checkpoint", str(ckpt), "--name", "tiny", "--version", "1", "--out", str(out), "--machine", "a test box",
            "--train-command", "python -m training.cli train --config c.yaml"]
    assert main(argv) == 0
    folder = out / "tiny" / "1"
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["command"] == "python -m training.export " + " ".join(argv)
    assert card["metrics"]["best"]["val_acc"] == 0.91 and card["training"]["data"]["name"] == "mnist"
    assert card["training"]["epochs"] == 3 and card["mpp"] is None and card["fp16_file"] is None
    assert card["training"]["time_s"] == 30.2 and card["training"]["machine"] == "a test box"
    assert card["training"]["command"] == "python -m training.cli train --config c.yaml" and "patch_um" not in card
    assert card["training"]["devices"] == ["cpu: 2 threads", "cuda: NVIDIA H100"]

    (folder / "marker").write_text("old")
    capsys.readouterr()
    assert main(argv) == 2, "an existing version is refused"
    assert "already exists" in capsys.readouterr().err and (folder / "marker").exists()
    assert main(argv + ["--force"]) == 0
    assert sorted(os.listdir(folder)) == [CARD_FILE, GRAPH_FILE] and sorted(os.listdir(out / "tiny")) == ["1"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None], ids=["empty", "garbage", "missing"])
def test_cli_unreadable_checkpoint(tmp_path, capsys, content):
    ckpt = tmp_path / "ckpt.pt"
    if content is not None:
        ckpt.write_bytes(content)
    out = tmp_path / "models"
    assert main(["--checkpoint", str(ckpt), "--name", "x", "--version", "1", "--out", str(out)]) == 2
    assert str(ckpt) in capsys.readouterr().err
    assert not out.exists()
