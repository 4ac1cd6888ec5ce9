"""Trainer: exact resumption, data fingerprints, schedules, optimizers, metrics log."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.checkpoint import CheckpointError, DataMismatchError, load_checkpoint
from training.config import ScheduleConfig, config_from_dict
from training.data.common import TensorImageDataset
from training.networks import create_model
from training.trainer import LATEST, METRICS, Trainer, build_optimizer, lr_lambda, seed_everything

DROPOUT = {"attn_drop": 0.1, "value_drop": 0.1}  # dropout makes the RNG state matter on resume


def _synthetic(n: int, seed: int) -> TensorImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 16, 16, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return TensorImageDataset(images, labels)


def _config(out_dir, epochs: int = 2, schedule: str = "cosine", optim: str = "adam", max_steps: int | None = None,
            **run):
    return config_from_dict({
        "model": {"name": "gsa_tiny_r4", "overrides": DROPOUT},
        "optim": {"name": optim, "lr": 1e-2, "weight_decay": 1e-4},
        "schedule": {"name": schedule, "warmup_epochs": 0.5, "milestones": [1]},
        "train": {"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "device": "cpu",
                  "out_dir": str(out_dir), "progress": False, "grad_clip": 1.0, "label_smoothing": 0.1,
                  "max_steps_per_epoch": max_steps, **run},
    })


def _trainer(out_dir, train_set, val_set, seed: int = 0, **kw) -> Trainer:
    seed_everything(seed)
    model = create_model("gsa_tiny_r4", **DROPOUT)
    return Trainer(model, train_set, val_set, _config(out_dir, **kw))


@pytest.fixture(scope="module")
def data():
    return _synthetic(16, seed=1), _synthetic(8, seed=2)  # 2 steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    trainer = _trainer(tmp_path_factory.mktemp("full"), *data)
    trainer.fit()
    return trainer


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what} {key} differs"


def _cut_and_resumed(out_dir, data, **kw) -> Trainer:
    """A run stopped after one epoch, then resumed in a fresh trainer (other init and RNG state:
    everything must come from the checkpoint) and trained to the end."""
    first = _trainer(out_dir, *data, **kw)
    first.fit(stop_after=1)
    assert first.epoch == 1
    resumed = _trainer(out_dir, *data, seed=123, **kw)
    resumed.resume(out_dir / LATEST)
    resumed.fit()
    return resumed


def test_resume_gives_exactly_the_uninterrupted_weights(data, uninterrupted, tmp_path):
    resumed = _cut_and_resumed(tmp_path, data)
    assert resumed.epoch == uninterrupted.epoch == 2
    assert resumed.global_step == uninterrupted.global_step == 4
    _assert_same_state(resumed.model.state_dict(), uninterrupted.model.state_dict(), "weight")
    opt_a, opt_b = resumed.optimizer.state_dict()["state"], uninterrupted.optimizer.state_dict()["state"]
    for idx in opt_b:
        _assert_same_state(opt_a[idx], opt_b[idx], f"optimizer state of param {idx}")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in uninterrupted.history]
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_uninterrupted_training_changes_weights_and_logs(uninterrupted):
    fresh = create_model("gsa_tiny_r4", **DROPOUT)
    changed = [k for k, v in uninterrupted.model.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert changed, "training left every weight at its initial value"
    rows = [json.loads(line) for line in (uninterrupted.out_dir / METRICS).read_text().splitlines()]
    expected = {"epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "time_s", "images_per_s", "device"}
    assert len(rows) == 2 and all(expected <= set(row) for row in rows)
    assert rows[1]["step"] == 4 and rows[0]["images_per_s"] > 0
    assert rows[0]["device"] == f"cpu: {torch.get_num_threads()} threads"


def test_checkpoint_contents(uninterrupted):
    ckpt = load_checkpoint(uninterrupted.out_dir / LATEST)
    assert ckpt["model_name"] == "gsa_tiny_r4"
    assert ckpt["model_config"]["attn_drop"] == 0.1
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4
    assert len(ckpt["data_fingerprint"]) == 64
    assert {"optimizer_state", "scheduler_state", "rng", "history", "train_config", "best"} <= set(ckpt)
    assert (uninterrupted.out_dir / "checkpoint_best.pt").is_file()


def test_resume_refuses_other_data_unless_forced(data, uninterrupted, tmp_path):
    other_val = _synthetic(8, seed=3)
    trainer = _trainer(tmp_path, data[0], other_val)
    with pytest.raises(DataMismatchError, match="fingerprint"):
        trainer.resume(uninterrupted.out_dir / LATEST)
    trainer.resume(uninterrupted.out_dir / LATEST, force=True)
    assert trainer.epoch == 2


def test_fingerprint_tracks_the_data(data, tmp_path):
    a = _trainer(tmp_path, *data).fingerprint
    assert a == _trainer(tmp_path, *data).fingerprint
    assert a != _trainer(tmp_path, data[1], data[0]).fingerprint  # train and val swapped


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers(name, data, tmp_path):
    trainer = _trainer(tmp_path, *data, epochs=1, optim=name, max_steps=1)
    assert type(trainer.optimizer).__name__.lower() == name
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_optimizer_hyperparameters():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = config_from_dict({"optim": {"name": "sgd", "lr": 0.5, "momentum": 0.8, "weight_decay": 0.01}}).optim
    group = build_optimizer(params, cfg).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.8, 0.01)


def test_warmup_cosine_schedule():
    factor = lr_lambda(ScheduleConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.1), steps_per_epoch=10, epochs=5)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(50) == pytest.approx(0.1)
    values = [factor(s) for s in range(10, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_multistep_and_constant_schedules():
    multi = lr_lambda(ScheduleConfig(name="multistep", milestones=(2, 4), gamma=0.1), steps_per_epoch=5, epochs=6)
    assert [multi(s) for s in (0, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    const = lr_lambda(ScheduleConfig(name="constant"), steps_per_epoch=5, epochs=6)
    assert {const(s) for s in range(30)} == {1.0}


def test_scheduler_steps_per_optimizer_step(data, tmp_path):
    trainer = _trainer(tmp_path, *data, epochs=2, schedule="cosine", max_steps=1)
    trainer.fit()
    assert trainer.steps_per_epoch == 1
    assert trainer.scheduler.last_epoch == trainer.global_step == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_lambda(trainer.config.schedule, 1, 2)(2))
    assert trainer.history[1]["lr"] == pytest.approx(1e-2 * lr_lambda(trainer.config.schedule, 1, 2)(1))


@pytest.mark.parametrize("form", ["paper", "aligned"])
def test_bf16_autocast_step_runs_attention_in_float32(form):
    """Under autocast the projections run in bf16 but the attention kernel (scores, softmax, the
    hand-written backward) must run in float32: mixed dtypes used to raise inside it on CUDA."""
    torch.manual_seed(0)
    model = create_model("gsa_tiny_r4", form=form, **DROPOUT)
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_rotation_augmentation_resumes_exactly_and_changes_training(data, uninterrupted, tmp_path):
    full = _trainer(tmp_path / "full", *data, augment_rotation=True)
    full.fit()
    resumed = _cut_and_resumed(tmp_path / "cut", data, augment_rotation=True)
    _assert_same_state(resumed.model.state_dict(), full.model.state_dict(), "weight")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    # same seeds and batches without augmentation give other losses: the images were rotated
    assert [r["train_loss"] for r in full.history] != [r["train_loss"] for r in uninterrupted.history]


def test_init_from_loads_the_weights_and_starts_fresh(data, uninterrupted, tmp_path):
    source = uninterrupted.out_dir / LATEST
    trainer = _trainer(tmp_path, *data, seed=7, init_from=str(source))
    _assert_same_state(trainer.model.state_dict(), load_checkpoint(source)["model_state"], "weight")
    assert trainer.epoch == 0 and trainer.global_step == 0 and trainer.best is None
    assert trainer.optimizer.state_dict()["state"] == {}
    trainer.fit(stop_after=1)
    assert trainer.config.train.init_from == str(source)
    assert load_checkpoint(tmp_path / LATEST)["train_config"]["train"]["init_from"] == str(source)


def test_init_from_refuses_another_model(data, uninterrupted, tmp_path):
    seed_everything(0)
    model = create_model("gsa_tiny_r4", form="aligned", **DROPOUT)  # same parameter shapes, other maths
    config = _config(tmp_path, init_from=str(uninterrupted.out_dir / LATEST))
    with pytest.raises(CheckpointError, match="another config .*form: 'paper' there, 'aligned' here"):
        Trainer(model, *data, config)
    with pytest.raises(CheckpointError, match="no such file"):
        _trainer(tmp_path, *data, init_from=str(tmp_path / "missing.pt"))


def test_init_from_and_resume_accept_another_chunk_size(data, uninterrupted, tmp_path):
    """``chunk_elements`` sets speed and memory only: a GPU-trained checkpoint fine-tunes or resumes on
    a CPU with CPU-sized chunks. Fine-tuning may also change the dropout rates; resuming may not."""
    source = uninterrupted.out_dir / LATEST
    seed_everything(0)
    model = create_model("gsa_tiny_r4", attn_drop=0.2, value_drop=0.0, chunk_elements=4096)
    trainer = Trainer(model, *data, _config(tmp_path / "ft", init_from=str(source)))
    _assert_same_state(trainer.model.state_dict(), load_checkpoint(source)["model_state"], "weight")
    resumed = Trainer(create_model("gsa_tiny_r4", **DROPOUT, chunk_elements=4096), *data, _config(tmp_path / "r"))
    resumed.resume(source)
    assert resumed.epoch == uninterrupted.epoch
    other = Trainer(create_model("gsa_tiny_r4", attn_drop=0.2, value_drop=0.1), *data, _config(tmp_path / "o"))
    with pytest.raises(CheckpointError, match="attn_drop: 0.1 there, 0.2 here"):
        other.resume(source)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_average_of_the_steps_and_resumes_exactly(data, tmp_path, warmup):
    decay = 0.5
    full = _trainer(tmp_path / "full", *data, ema_decay=decay, ema_warmup=warmup)
    # The average by hand: the first update copies, the one after t earlier updates is
    # d * avg + (1 - d) * w, with d = decay, or min(decay, (1 + t) / (10 + t)) with the warm-up
    # (2/11, 3/12, 4/13 here: the warm-up decides every step).
    expected, steps = None, []
    full.optimizer.register_step_post_hook(
        lambda *_: steps.append({k: v.detach().clone() for k, v in full.model.named_parameters()}))
    full.fit()
    for t, weights in enumerate(steps):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        expected = dict(weights) if expected is None else {
            k: d * expected[k] + (1 - d) * w for k, w in weights.items()}
    averaged = dict(full.ema.module.named_parameters())
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-6, atol=1e-7)
    assert int(full.ema.n_averaged) == len(steps) == 4
    # the checkpoint's model_state (validated, exported) is the average, the raw weights beside it
    ckpt = load_checkpoint(tmp_path / "full" / LATEST)
    _assert_same_state(ckpt["model_state"], full.ema.module.state_dict(), "averaged weight")
    _assert_same_state(ckpt["raw_model_state"], full.model.state_dict(), "raw weight")
    assert not all(torch.equal(ckpt["model_state"][k], ckpt["raw_model_state"][k]) for k in expected)
    # validation used the averaged weights
    from training.evaluate import evaluate_loader
    val = evaluate_loader(full.ema.module, full.val_loader, full.device)
    assert full.history[-1]["val_loss"] == pytest.approx(val["loss"], rel=1e-6)

    resumed = _cut_and_resumed(tmp_path / "cut", data, ema_decay=decay, ema_warmup=warmup)
    _assert_same_state(resumed.model.state_dict(), full.model.state_dict(), "raw weight")
    _assert_same_state(resumed.ema.module.state_dict(), full.ema.module.state_dict(), "averaged weight")
    assert int(resumed.ema.n_averaged) == 4


def test_ema_decay_must_be_a_fraction(tmp_path):
    from training.config import ConfigError
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match="ema_decay"):
            _config(tmp_path, ema_decay=bad)


class _Killed(Exception):
    """Stands for the process being killed."""


def test_a_run_killed_inside_an_epoch_resumes_exactly_from_its_step_checkpoint(tmp_path):
    """4 steps an epoch, a step checkpoint after each; the run is killed in the second epoch after
    its 2nd step (global step 6), resumed in a fresh trainer, and ends with exactly the weights,
    average and per-epoch figures of a run never interrupted (and never step-checkpointed)."""
    data = _synthetic(32, seed=3), _synthetic(8, seed=4)
    kw = {"augment_d4": True, "ema_decay": 0.9}
    full = _trainer(tmp_path / "full", *data, **kw)
    full.fit()

    cut = _trainer(tmp_path / "cut", *data, checkpoint_every_steps=1, **kw)
    step = cut._train_step
    def dies_before_step_7(x, y):
        if cut.global_step == 6:
            raise _Killed
        return step(x, y)
    cut._train_step = dies_before_step_7
    with pytest.raises(_Killed):
        cut.fit()
    ckpt = load_checkpoint(tmp_path / "cut" / LATEST)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["partial_epoch"]["steps"]) == (1, 6, 2)
    assert ckpt["partial_epoch"]["seen"] == 16
    assert len(ckpt["history"]) == 1  # the epoch records stay once an epoch

    resumed = _trainer(tmp_path / "cut", *data, seed=123, checkpoint_every_steps=1, **kw)
    resumed.resume(tmp_path / "cut" / LATEST)
    assert resumed.partial["steps"] == 2
    resumed.fit()
    assert (resumed.epoch, resumed.global_step, resumed.partial) == (2, 8, None)
    _assert_same_state(resumed.model.state_dict(), full.model.state_dict(), "raw weight")
    _assert_same_state(resumed.ema.module.state_dict(), full.ema.module.state_dict(), "averaged weight")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "step"):
        assert [r[key] for r in resumed.history] == [r[key] for r in full.history], key
    final = load_checkpoint(tmp_path / "cut" / LATEST)
    assert final["partial_epoch"] is None and final["global_step"] == 8
    metrics = [json.loads(line) for line in (tmp_path / "cut" / METRICS).read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]

    # the step count must fit the epochs of the resuming run
    other = _trainer(tmp_path / "other", *data, checkpoint_every_steps=1, batch_size=16, **kw)
    with pytest.raises(CheckpointError, match="after step 2 of an epoch, but epochs here have 2 steps"):
        other.resume(_mid_epoch_copy(tmp_path, ckpt))


def _mid_epoch_copy(tmp_path, ckpt):
    from training.checkpoint import save_checkpoint
    return save_checkpoint(tmp_path / "mid.pt", {k: v for k, v in ckpt.items() if k != "format"})


def test_checkpoint_every_steps_must_be_positive(tmp_path):
    from training.config import ConfigError
    with pytest.raises(ConfigError, match="checkpoint_every_steps must be >= 1"):
        _config(tmp_path, checkpoint_every_steps=0)
