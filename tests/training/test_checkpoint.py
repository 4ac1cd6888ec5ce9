"""Checkpoints: round trip, atomic writes, RNG states, and clear errors for broken files."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random

import numpy as np
import pytest
import torch

from training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from training.networks import create_model


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("gsa_tiny_r4", attn_drop=0.1)
    path = save_checkpoint(tmp_path / "ckpt.pt", {
        "model_name": model.name, "model_config": dataclasses.asdict(model.config),
        "model_state": model.state_dict(), "epoch": 3, "global_step": 30, "rng": capture_rng_state(),
    })
    return path, model


def test_round_trip_rebuilds_the_model(saved):
    path, model = saved
    rebuilt, ckpt = load_model(path)
    assert ckpt["epoch"] == 3 and rebuilt.name == "gsa_tiny_r4" and rebuilt.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_a_clear_error(saved, cut):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
        load_checkpoint(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, match",
    [(b"", "file is empty"), (b"\x80\x04garbage bytes", "not a readable checkpoint"),
     (os.urandom(4096), "not a readable checkpoint")],
)
def test_garbage_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_code_in_a_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"x": 1}))  # a plain pickle is not a torch checkpoint either
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_wrong_contents_are_clear_errors(tmp_path, saved):
    path = tmp_path / "other.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict, got list"):
        load_checkpoint(path)
    torch.save({"model_state": {}}, path)
    with pytest.raises(CheckpointError, match=r"missing entries \['format'"):
        load_checkpoint(path)
    ckpt = load_checkpoint(saved[0])
    torch.save({**ckpt, "format": 99}, path)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "bogus": 1}}, path)
    with pytest.raises(CheckpointError, match="cannot rebuild model 'gsa_tiny_r4'.*bogus"):
        load_model(path)


def test_save_is_atomic(saved, monkeypatch):
    path, _ = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed half-way through writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model_name": "x"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temporary file left behind"
