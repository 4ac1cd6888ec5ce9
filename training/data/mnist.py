"""MNIST from the files users download (IDX, optionally gzipped) or an ``.npz``, rotated the way
RotMNIST was made.

RotMNIST (Larochelle et al. 2007) rotates every digit by an angle drawn uniformly from
[0, 2 pi). :class:`MNISTDataset` does the same, once, at construction: the angle of each digit
comes from a generator seeded with ``rotation_seed`` and indexed by the digit's position in its
source file (so a digit keeps its angle whichever split it falls into), and the rotation is
bilinear (:func:`training.data.transforms.rotate_bilinear`). The angles are kept in
``dataset.angles``.

Splits:
    ``train`` / ``val``: a seeded random partition of the training file (``val_size`` digits
    for validation). A seeded permutation, not a slice: some MNIST subsets (the 10k ``.npz``
    beside the project) are grouped by class.
    ``test``: the ``t10k`` IDX files of a directory (an ``.npz`` has no test split).
    ``all``: every digit of the training file (or of the ``.npz``) in file order.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.common import TensorImageDataset, file_identity, indices_digest, require_file, seeded_split
from training.data.transforms import random_angles, rotate_bilinear

__all__ = ["read_idx", "read_mnist_npz", "find_idx_pair", "MNISTDataset", "MNIST_SPLITS"]

MNIST_SPLITS = ("train", "val", "test", "all")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``train-images-idx3-ubyte``, optionally ``.gz``) into an array.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The header or the size of the file is not a valid IDX file.
    """
    path = require_file(path, "IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _check_mnist_arrays(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{source}: expected images uint8 [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{source}: expected {images.shape[0]} labels [N], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{source}: labels must be integers in 0..9")


def read_mnist_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``images`` (uint8 ``[N, 28, 28]``) and ``labels`` (``[N]``) from an ``.npz``."""
    path = require_file(path, "MNIST .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"images", "labels"} - set(npz.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {npz.files})")
            images, labels = npz["images"], npz["labels"]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    _check_mnist_arrays(images, labels, str(path))
    return images, labels


def find_idx_pair(root: str | Path, prefix: str) -> tuple[Path, Path]:
    """The images and labels IDX files of ``prefix`` (``train`` or ``t10k``) in ``root``.

    Accepts the official names with or without ``.gz`` and the ``-idx3-ubyte`` / ``.idx3-ubyte``
    spellings.
    """
    root = Path(root)
    found = []
    for kind, nd in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}{sep}idx{nd}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
        paths = [root / n for n in names if (root / n).is_file()]
        if not paths:
            raise FileNotFoundError(f"MNIST {prefix} {kind} not found in {root} (looked for {', '.join(names)})")
        found.append(paths[0])
    return found[0], found[1]


def _load_source(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    if root.suffix == ".npz" or root.is_file():
        if split == "test":
            raise ValueError(f"{root}: an .npz holds one set of digits and has no 'test' split; "
                             "use split 'all' on a test .npz, or a directory of IDX files")
        images, labels = read_mnist_npz(root)
        return images, labels, [root]
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST data not found: {root} (expected an .npz file or a directory of IDX files)")
    img_path, lbl_path = find_idx_pair(root, "t10k" if split == "test" else "train")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    _check_mnist_arrays(images, labels, f"{img_path} / {lbl_path}")
    return images, labels, [img_path, lbl_path]


class MNISTDataset(TensorImageDataset):
    """MNIST digits as ``[1, 28, 28]`` floats in [0, 1], rotated by seeded random angles.

    Args:
        root: An ``.npz`` file (``images``, ``labels``) or a directory of MNIST IDX files.
        split: One of ``train``, ``val``, ``test``, ``all`` (see the module docstring).
        val_size: Number of validation digits taken from the training file.
        split_seed: Seed of the train/validation permutation.
        rotate: Rotate each digit by a random angle in [0, 2 pi) (RotMNIST); off: plain MNIST.
        rotation_seed: Seed of the angles.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        val_size: int = 1000,
        split_seed: int = 0,
        rotate: bool = True,
        rotation_seed: int = 0,
    ):
        if split not in MNIST_SPLITS:
            raise ValueError(f"MNIST split must be one of {MNIST_SPLITS}, got {split!r}")
        root = Path(root)
        images, labels, files = _load_source(root, split)
        n = images.shape[0]
        indices = seeded_split(n, val_size, split_seed, split) if split in ("train", "val") else np.arange(n)
        x = torch.from_numpy(images[indices].astype(np.float32) / 255.0).unsqueeze(1)  # N, 1, H, W
        angles = random_angles(n, rotation_seed)[torch.from_numpy(indices)] if rotate else torch.zeros(len(indices), dtype=torch.float64)
        if rotate:
            x = rotate_bilinear(x, angles).clamp_(0.0, 1.0)
        self.indices = indices
        self.angles = angles
        identity: dict[str, Any] = {
            "dataset": "mnist", "files": [file_identity(p) for p in files], "split": split,
            "indices_sha256": indices_digest(indices), "rotate": rotate,
        }
        if split in ("train", "val"):
            identity.update(val_size=val_size, split_seed=split_seed)
        if rotate:
            identity["rotation_seed"] = rotation_seed
        super().__init__(x, torch.from_numpy(labels[indices].astype(np.int64)), identity)
