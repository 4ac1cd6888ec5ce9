"""Shared pieces of the dataset readers: file checks, seeded splits, identities and fingerprints.

Every dataset here returns ``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` in [0, 1]
and ``label`` an ``int``, and describes itself with :meth:`identity`: the files it read (names
and sizes), its split, the indices it took and every seed involved. The trainer hashes the
identities of its training and validation sets into a data fingerprint that checkpoints carry,
so that a run never resumes silently on different data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "require_file",
    "file_identity",
    "indices_digest",
    "seeded_split",
    "TensorImageDataset",
    "dataset_identity",
    "dataset_fingerprint",
]

logger = logging.getLogger(__name__)


def require_file(path: str | Path, what: str) -> Path:
    """Return ``path`` as a :class:`Path`, or raise ``FileNotFoundError`` naming it and its role."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def file_identity(path: str | Path) -> dict[str, Any]:
    """Name and size of a file: cheap, and enough to tell two downloads or subsets apart."""
    path = Path(path)
    return {"name": path.name, "size": path.stat().st_size}


def indices_digest(indices: np.ndarray | torch.Tensor | Sequence[int]) -> str:
    """sha256 of an index array (as int64), so identities stay short for large splits."""
    arr = np.asarray(indices, dtype=np.int64)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def seeded_split(n: int, val_size: int, seed: int, split: str) -> np.ndarray:
    """Indices of a seeded random train/validation partition of ``n`` items.

    The permutation comes from ``numpy.random.default_rng(seed)``, so the partition is the
    same on every machine; the validation part is the first ``val_size`` items of it.

    Args:
        n: Number of items in the source.
        val_size: Number of validation items.
        seed: Seed of the permutation.
        split: ``"train"`` or ``"val"``.
    """
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    if split == "val":
        return np.sort(perm[:val_size])
    if split == "train":
        return np.sort(perm[val_size:])
    raise ValueError(f"seeded_split takes split 'train' or 'val', got {split!r}")


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor ``[N, C, H, W]`` with int labels.

    Args:
        images: Float tensor ``[N, C, H, W]`` with values in [0, 1], or uint8 (kept as uint8 to
            save memory, scaled by 1/255 per item).
        labels: Integer tensor ``[N]``.
        identity: What the data is (files, split, seeds); content-hashed when omitted.
        class_names: Optional names of the classes.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        identity: dict[str, Any] | None = None,
        class_names: Sequence[str] = (),
    ):
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = (images if images.dtype == torch.uint8 else images.float()).contiguous()
        self.labels = labels.long().contiguous()
        self.class_names = tuple(class_names)
        self._identity = identity

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        return image, int(self.labels[index])

    def identity(self) -> dict[str, Any]:
        if self._identity is not None:
            return self._identity
        digest = hashlib.sha256(self.images.numpy().tobytes() + self.labels.numpy().tobytes()).hexdigest()
        return {"dataset": "tensor", "content_sha256": digest}


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """``dataset.identity()``, or a weaker stand-in (type and length) with a warning."""
    if hasattr(dataset, "identity"):
        return dataset.identity()
    logger.warning("%s has no identity(); its fingerprint covers only its type and length", type(dataset).__name__)
    return {"dataset": type(dataset).__name__, "length": len(dataset)}


def dataset_fingerprint(**datasets: Dataset) -> str:
    """sha256 over the identities of named datasets (``train=..., val=...``)."""
    payload = {name: dataset_identity(ds) for name, ds in sorted(datasets.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
