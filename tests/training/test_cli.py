"""Configs (YAML, overrides, validation), rotated evaluation, and the CLI end to end on tiny data."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from training.checkpoint import load_checkpoint
from training.cli import main
from training.config import ConfigError, config_to_dict, load_config
from training.data.common import TensorImageDataset
from training.evaluate import evaluate_rotations, expected_calibration_error, roc_auc, wilson_interval

REPO = Path(__file__).resolve().parents[2]


# ---- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["r4", "r8", "z2"])
def test_shipped_rotmnist_configs_are_valid(group):
    config = load_config(REPO / "configs" / f"rotmnist_{group}.yaml")
    assert config.model.name == f"gsa_rotmnist_{group}"
    assert config.model.overrides == {"attn_drop": 0.1, "value_drop": 0.1}
    assert config.data.root.endswith("mnist-train-10k.npz") and config.data.val_split == "val"
    assert (config.optim.name, config.optim.weight_decay) == ("adam", 1e-4)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.data.val_split != "test" and config.train.out_dir.startswith("runs/")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_and_coercions(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1e-3\nschedule:\n  name: multistep\n")
    config = load_config(path, ["train.batch_size=64", "schedule.milestones=[30, 60]",
                                "model.overrides.attn_drop=0.2", "train.grad_clip=1"])
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)  # YAML reads "1e-3" as a string
    assert config.train.batch_size == 64 and config.schedule.milestones == (30, 60)
    assert config.model.overrides == {"attn_drop": 0.2} and config.train.grad_clip == 1.0
    assert load_config(None, []).train.epochs == 10
    assert config_to_dict(config)["schedule"]["milestones"] == [30, 60]


def test_yaml_words_on_off_yes_no_stay_strings(tmp_path):
    # YAML 1.1 reads off/on/yes/no as booleans; the configs use YAML 1.2 booleans (true/false).
    path = _write(tmp_path, "train:\n  amp: off\n  progress: false\n")
    assert load_config(path).train.amp == "off" and load_config(path).train.progress is False
    assert load_config(path, ["train.amp=bf16", "train.progress=true"]).train.amp == "bf16"
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="train.progress: expected bool, got str 'yes'"):
        load_config(None, ["train.progress=yes"])


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("trian:\n  epochs: 3\n", [], r"unknown keys \['trian'\]"),
        ("train:\n  bach_size: 3\n", [], r"unknown keys \['train.bach_size'\]"),
        ("train:\n  batch_size: big\n", [], r"train.batch_size: expected int, got str 'big'"),
        ("train:\n  epochs: 1.5\n", [], "train.epochs: expected int"),
        ("train:\n  progress: 1\n", [], "train.progress: expected bool"),
        ("schedule:\n  milestones: 5\n", [], "schedule.milestones: expected a list"),
        ("optim:\n  betas: [0.9]\n", [], "optim.betas: expected 2 items"),
        ("optim:\n  name: rmsprop\n", [], "optim.name must be one of"),
        ("train: 5\n", [], "section train. must be a mapping"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("train: [unclosed\n", [], "invalid YAML"),
        ("", ["train.epochs=0"], "train.epochs must be >= 1"),
        ("", ["data.val_split=test"], "must not be the test set"),
        ("", ["model.overrides.atn_drop=0.1"], r"unknown model.overrides \['atn_drop'\]"),
        ("", ["model.overrides.attn_drop=high"], "model.overrides.attn_drop: expected float"),
        ("", ["model.name=gsa_nonexistent"], "unknown model 'gsa_nonexistent'"),
        ("", ["train.epochs"], "expected key=value"),
        ("", ["train.epochs.x=1"], "train.epochs: expected int, got dict"),
        ("train:\n  epochs: 3\n", ["train.epochs.x=1"], "epochs is not a section"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, text, overrides, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value) or "--set" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


# ---- rotated evaluation ----------------------------------------------------------------------
class CornerModel(nn.Module):
    """Class c = which corner (top-left, top-right, bottom-right, bottom-left) is lit: not invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, -1], x[:, 0, -1, 0]], -1)


def test_evaluate_rotations_rotates_the_inputs():
    images = torch.zeros(8, 1, 5, 5)
    labels = torch.arange(8) % 4
    corners = [(0, 0), (0, 4), (4, 4), (4, 0)]
    for i, c in enumerate(labels.tolist()):
        images[i, 0, corners[c][0], corners[c][1]] = 1.0
    loader = DataLoader(TensorImageDataset(images, labels), batch_size=3)
    report = evaluate_rotations(CornerModel(), loader, 4, torch.device("cpu"), angles=[0, 90, 180], progress=False)
    assert report["accuracy"] == 1.0 and report["count"] == 8
    assert report["per_class_accuracy"] == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}
    assert report["rot90"]["0"] == {"accuracy": 1.0, "agreement_with_unrotated": 1.0}
    assert all(report["rot90"][str(a)]["accuracy"] == 0.0 for a in (90, 180, 270))
    assert [r["accuracy"] for r in report["rotations"]] == [1.0, 0.0, 0.0]
    low, high = report["accuracy_ci95"]  # 8 of 8: Wilson's lower bound is n / (n + z^2)
    assert high == 1.0 and low == pytest.approx(8 / (8 + 1.959963984540054**2), rel=1e-12)


def _wilson_by_bisection(correct: int, count: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The interval's ends as the roots of |p_hat - p| = z sqrt(p (1 - p) / n), found numerically."""
    p_hat = correct / count

    def outside(p: float) -> bool:
        return abs(p_hat - p) > z * math.sqrt(p * (1 - p) / count)

    def root(inside: float, out: float) -> float:
        for _ in range(200):
            mid = (inside + out) / 2
            inside, out = (inside, mid) if outside(mid) else (mid, out)
        return (inside + out) / 2

    return root(p_hat, 0.0) if correct else 0.0, root(p_hat, 1.0) if correct < count else 1.0


@pytest.mark.parametrize("correct,count", [(973, 1000), (950, 1000), (1, 10), (0, 10), (10, 10), (5, 9)])
def test_wilson_interval_matches_its_definition(correct, count):
    low, high = wilson_interval(correct, count)
    ref_low, ref_high = _wilson_by_bisection(correct, count)
    assert low == pytest.approx(ref_low, abs=1e-12) and high == pytest.approx(ref_high, abs=1e-12)
    assert 0.0 <= low <= correct / count <= high <= 1.0


def test_wilson_interval_figures_and_errors():
    low, high = wilson_interval(973, 1000)
    assert (round(low, 4), round(high, 4)) == (0.961, 0.9814)
    with pytest.raises(ValueError, match="count must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct must be in"):
        wilson_interval(11, 10)


def test_roc_auc_counts_ordered_pairs():
    """AUC = P(score of a positive > score of a negative) + P(tie) / 2, counted over all pairs,
    against the service's numpy version (two implementations, one definition)."""
    from service.scoring.evaluation import roc_auc as numpy_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.4 * y, 2)  # rounded: many ties
    pairs = [(a, b) for a in s[y == 1] for b in s[y == 0]]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(torch.tensor(y == 1), torch.tensor(s)) == pytest.approx(expected, abs=1e-12)
    assert numpy_auc(y, s) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(torch.ones(3, dtype=torch.bool), torch.rand(3)) is None


def test_expected_calibration_error():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])  # the third is wrong with confidence 0.6
    # one sample per bin: mean of |confidence - correct| = (0.1 + 0.2 + 0.6 + 0.3) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3, abs=1e-6)
    both = torch.tensor([[0.75, 0.25], [0.75, 0.25]])  # one bin: confidence 0.75, accuracy 0.5
    assert expected_calibration_error(both, torch.tensor([0, 1])) == pytest.approx(0.25, abs=1e-6)


# ---- the CLI end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of gsa_tiny_r4 on 32 random 16x16 'digits' through ``gsa train``."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    npz = root / "tiny.npz"
    np.savez(npz, images=rng.integers(0, 256, (32, 16, 16), dtype=np.uint8), labels=rng.integers(0, 10, 32))
    config = REPO / "configs" / "rotmnist_r4.yaml"
    base = [f"--config={config}", "--set", "model.name=gsa_tiny_r4", "--set", f"data.root={npz}",
            "--set", "data.options.val_size=8", "--set", "train.batch_size=8", "--set", "train.progress=false",
            "--set", f"train.out_dir={root / 'run'}", "--set", "train.device=cpu"]
    assert main(["train", *base, "--set", "train.epochs=1"]) == 0
    return root, npz, base


def test_cli_train_writes_checkpoints_and_log(tiny_run):
    root, _, _ = tiny_run
    run = root / "run"
    assert {"checkpoint_latest.pt", "checkpoint_best.pt", "metrics.jsonl", "config.yaml"} <= {p.name for p in run.iterdir()}
    ckpt = load_checkpoint(run / "checkpoint_latest.pt")
    assert ckpt["model_name"] == "gsa_tiny_r4" and ckpt["epoch"] == 1
    assert load_config(run / "config.yaml").model.name == "gsa_tiny_r4"


def test_cli_resume_continues(tiny_run):
    root, _, base = tiny_run
    latest = root / "run" / "checkpoint_latest.pt"
    assert main(["train", *base, "--set", "train.epochs=2", "--resume", str(latest)]) == 0
    assert load_checkpoint(latest)["epoch"] == 2
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_cli_evaluate_reports_rotations(tiny_run, capsys):
    root, npz, _ = tiny_run
    out = root / "eval.json"
    code = main(["evaluate", "--checkpoint", str(root / "run" / "checkpoint_best.pt"), "--data", str(npz),
                 "--split", "val", "--angle-step", "45", "--output", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["count"] == 8 and report["model"] == "gsa_tiny_r4"
    assert set(report["rot90"]) == {"0", "90", "180", "270"}
    assert [r["degrees"] for r in report["rotations"]] == [0, 45, 90, 135, 180, 225, 270, 315]
    # gsa_tiny_r4 is invariant to quarter turns: the exact rotations must not change a prediction
    assert all(v["agreement_with_unrotated"] == 1.0 for v in report["rot90"].values())
    assert len(report["per_class_accuracy"]) == 10
    # --no-turns: the same figures without the passes under turns and the mirror
    assert main(["evaluate", "--checkpoint", str(root / "run" / "checkpoint_best.pt"), "--data", str(npz),
                 "--split", "val", "--angle-step", "0", "--no-turns", "--no-progress"]) == 0
    lean = json.loads(capsys.readouterr().out)
    assert lean["rot90"] is None and lean["mirror"] is None and lean["rotations"] == []
    assert (lean["accuracy"], lean["roc_auc"], lean["ece"]) == (report["accuracy"], report["roc_auc"], report["ece"])
    assert lean["loss"] == pytest.approx(report["loss"], rel=1e-6)


def test_cli_evaluate_chunk_size_changes_nothing_but_speed(tiny_run, capsys):
    root, npz, _ = tiny_run
    argv = ["evaluate", "--checkpoint", str(root / "run" / "checkpoint_best.pt"), "--data", str(npz),
            "--split", "val", "--angle-step", "90", "--no-progress"]
    assert main(argv) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*argv, "--chunk-elements", "64"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["loss"] == pytest.approx(default["loss"], rel=1e-5)
    assert small["rotations"] == default["rotations"] and small["rot90"] == default["rot90"]


def test_cli_train_options_apply_to_the_training_split_only(tiny_run, tmp_path):
    """``data.train_options`` override ``data.options`` for the training split: here upright
    training digits (rotated afresh by the augmentation) and rotated validation digits."""
    from training.data.common import dataset_fingerprint
    from training.data.mnist import MNISTDataset

    _, npz, base = tiny_run
    out = tmp_path / "run"
    argv = ["train", *base, "--set", "train.epochs=1", "--set", f"train.out_dir={out}",
            "--set", "data.train_options.rotate=false", "--set", "train.augment_rotation=true"]
    assert main(argv) == 0
    assert load_config(out / "config.yaml").data.train_options == {"rotate": False}
    upright = MNISTDataset(npz, "train", val_size=8, rotate=False)
    rotated = MNISTDataset(npz, "train", val_size=8, rotate=True)
    val = MNISTDataset(npz, "val", val_size=8, rotate=True)
    fingerprint = load_checkpoint(out / "checkpoint_latest.pt")["data_fingerprint"]
    assert fingerprint == dataset_fingerprint(train=upright, val=val)
    assert fingerprint != dataset_fingerprint(train=rotated, val=val)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--set", "train.bach_size=8"], "unknown keys"),
        (["train", "--set", "data.train_options.rotation=false"], "no options \\['rotation'\\]"),
        (["evaluate", "--checkpoint", "x.pt", "--data", "x", "--chunk-elements", "0"], "--chunk-elements must be >= 1"),
        (["train", "--set", "data.root=/nonexistent/mnist.npz"], "/nonexistent/mnist.npz"),
        (["evaluate", "--checkpoint", "/nonexistent.pt", "--data", "x"], "/nonexistent.pt: no such file"),
    ],
)
def test_cli_errors_exit_2_with_a_message(argv, match, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert any(re.search(match, r.getMessage()) for r in caplog.records)


def test_cli_refuses_resume_on_other_data(tiny_run, tmp_path, caplog):
    root, _, base = tiny_run
    latest = root / "run" / "checkpoint_latest.pt"
    argv = ["train", *base, "--set", "data.options.split_seed=1", "--set", f"train.out_dir={tmp_path}",
            "--resume", str(latest)]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert any("fingerprint" in r.getMessage() for r in caplog.records)


# ---- plots -----------------------------------------------------------------------------------
def test_plot_writes_a_png_of_the_runs(tmp_path):
    from training.plot import main

    logs = {}
    for label, accs in {"Z2": [0.5, 0.7], "R4": [0.6, 0.9, 0.95]}.items():
        path = tmp_path / f"{label}.jsonl"
        path.write_text("".join(json.dumps({"epoch": i + 1, "val_acc": a}) + "\n" for i, a in enumerate(accs)))
        logs[label] = path
    out = tmp_path / "plot" / "acc.png"
    assert main(["--run", f"Z2={logs['Z2']}", "--run", f"R4={logs['R4']}", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


@pytest.mark.parametrize("content, match", [("{not json\n", "not JSON"), ('{"epoch": 1}\n', "'val_acc'"),
                                             ("", "no epoch records")])
def test_plot_rejects_malformed_logs(tmp_path, capsys, content, match):
    from training.plot import main

    path = tmp_path / "m.jsonl"
    path.write_text(content)
    assert main(["--run", f"A={path}", "--output", str(tmp_path / "a.png")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
