"""Checkpoints: written atomically, read safely, complete enough to resume a run exactly.

A checkpoint is a dict saved with :func:`torch.save` and read with ``weights_only=True`` (no
arbitrary pickle code runs on load). It holds:

- ``model_name``, ``model_config``: rebuild the model with
  :func:`training.networks.model_from_config` without parsing strings;
- ``model_state``, ``optimizer_state``, ``scheduler_state``;
- ``epoch`` (epochs completed), ``global_step``, ``rng`` (python, numpy, torch, CUDA states),
  ``history`` (one metrics dict per epoch), ``best``, ``train_config`` and ``data_fingerprint``.

Anything wrong with a file (missing, truncated, not a checkpoint, missing keys) raises
:class:`CheckpointError` with the path and the reason, never a raw unpickling traceback.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "REQUIRED_KEYS",
    "CheckpointError",
    "DataMismatchError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "capture_rng_state",
    "restore_rng_state",
    "model_metadata",
]

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "model_name", "model_config", "model_state", "epoch", "global_step")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with its path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DataMismatchError(CheckpointError):
    """Resuming on data whose fingerprint differs from the checkpoint's."""


def model_metadata(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(name, config dict)`` of a registry model (``model.name``, ``model.config``)."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(model).__name__} has no dataclass .config; checkpoints need one to rebuild the model")
    return getattr(model, "name", type(model).__name__), dataclasses.asdict(config)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state a training step touches, in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, then
    :func:`os.replace`, so a crash never leaves a half-written checkpoint under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint.

    Raises:
        CheckpointError: The file is missing, unreadable, truncated, not a checkpoint of this
            project, or lacks required entries.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protocol notices on foreign files: we report below
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling, zip and storage errors all mean the same thing here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"not a readable checkpoint (corrupt or truncated?): {type(exc).__name__}: {reason}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"missing entries {missing}; not a GSA-Serve checkpoint?")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"checkpoint format {ckpt['format']} is not the supported {CHECKPOINT_FORMAT}")
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint from its name and config and load its weights."""
    from training.networks import model_from_config

    ckpt = load_checkpoint(path, map_location)
    try:
        model = model_from_config(ckpt["model_name"], ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(path, f"cannot rebuild model {ckpt['model_name']!r}: {exc}") from None
    return model, ckpt
