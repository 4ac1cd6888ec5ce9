"""CIFAR-10 from its python pickle batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

The batches are pickles; they are read with an unpickler that only builds numpy arrays (and
refuses any other object), so a tampered file cannot run code. Splits: ``train`` / ``val`` (a
seeded random partition of the 50,000 training images, ``val_size`` for validation),
``trainval`` (all 50,000) and ``test`` (``test_batch``). Images are kept as uint8 in memory
(150 MB) and scaled to [0, 1] per item.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.common import TensorImageDataset, file_identity, indices_digest, require_file, seeded_split

__all__ = ["read_cifar_batch", "CIFAR10Batches", "CIFAR10_CLASS_NAMES", "CIFAR_SPLITS"]

CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_SPLITS = ("train", "val", "trainval", "test")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, 3, 32, 32]`` and labels int64 ``[N]`` of one CIFAR-10 batch file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a pickle, not a CIFAR-10 batch, or inconsistent arrays.
    """
    path = require_file(path, "CIFAR-10 batch")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 pickle batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected data uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: expected {data.shape[0]} labels in 0..9, got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _batch_folder(root: Path) -> Path:
    if (root / "cifar-10-batches-py").is_dir():
        return root / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {root}")
    return root


class CIFAR10Batches(TensorImageDataset):
    """CIFAR-10 images ``[3, 32, 32]`` in [0, 1].

    Args:
        root: Folder with the batches (or its parent holding ``cifar-10-batches-py``).
        split: ``train``, ``val``, ``trainval`` or ``test``.
        val_size: Validation images held out of the training batches.
        split_seed: Seed of the train/validation permutation.
    """

    def __init__(self, root: str | Path, split: str = "train", val_size: int = 5000, split_seed: int = 0):
        if split not in CIFAR_SPLITS:
            raise ValueError(f"CIFAR-10 split must be one of {CIFAR_SPLITS}, got {split!r}")
        folder = _batch_folder(Path(root))
        paths = [folder / TEST_BATCH] if split == "test" else [folder / name for name in TRAIN_BATCHES]
        parts = [read_cifar_batch(p) for p in paths]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        n = len(labels)
        indices = seeded_split(n, val_size, split_seed, split) if split in ("train", "val") else np.arange(n)
        identity: dict[str, Any] = {"dataset": "cifar10", "split": split, "files": [file_identity(p) for p in paths],
                                    "indices_sha256": indices_digest(indices)}
        if split in ("train", "val"):
            identity.update(val_size=val_size, split_seed=split_seed)
        super().__init__(torch.from_numpy(images[indices]), torch.from_numpy(labels[indices]), identity,
                         CIFAR10_CLASS_NAMES)
