"""RotMNIST from the official LISA-lab ``.amat`` files (Larochelle et al. 2007, "mnist_rotation_new").

Files: ``mnist_all_rotation_normalized_float_train_valid.amat`` (12,000 digits) and
``mnist_all_rotation_normalized_float_test.amat`` (50,000). Each line holds 784 floats in [0, 1]
and then the label (written as a float).

Orientation: the LISA-lab files store each image column by column, i.e. a row-major reshape to
28x28 gives the *transpose* of the digit (a mirror image about the diagonal). With
``transpose=True`` (the default) we transpose back, so digits have MNIST's handedness and match
:class:`~training.data.mnist.MNISTDataset`. The common loaders (Cohen & Welling's gconv
experiments, Romero & Cordonnier's g_selfatt) reshape without transposing: under random
rotations that only mirrors every digit, which a model trained and tested on the same files never
notices, but a model moved between the two sources would. ``transpose=False`` reproduces them.

Splits: ``train`` = the first 10,000 digits of the train_valid file, ``val`` = its last 2,000
(the split the dataset's authors and the papers use), ``trainval`` = all 12,000, ``test`` = the
test file. ``root`` is the folder holding the files, or one ``.amat`` file (any split then means
"all of this file").
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from training.data.common import TensorImageDataset, file_identity, indices_digest, require_file

__all__ = ["read_amat", "RotMNISTAmat", "AMAT_FILES", "ROTMNIST_SPLITS"]

AMAT_FILES = {
    "train_valid": "mnist_all_rotation_normalized_float_train_valid.amat",
    "test": "mnist_all_rotation_normalized_float_test.amat",
}
ROTMNIST_SPLITS = ("train", "val", "trainval", "test")
NUM_TRAIN = 10_000


def read_amat(path: str | Path, transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 ``[N, 28, 28]`` in [0, 1] and labels int64 ``[N]`` from an ``.amat`` file.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Rows that are not 785 numbers, pixels outside [0, 1], labels not in 0..9.
    """
    path = require_file(path, "RotMNIST .amat file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file is reported below
            data = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: not an .amat matrix of numbers ({exc})") from None
    if data.size == 0:
        raise ValueError(f"{path}: file holds no rows")
    if data.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 numbers per row (784 pixels and the label), got {data.shape[1]}")
    pixels, raw_labels = data[:, :784], data[:, 784]
    if pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(f"{path}: pixel values outside [0, 1] (range {pixels.min()}..{pixels.max()})")
    labels = raw_labels.astype(np.int64)
    if not np.array_equal(labels, raw_labels) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels (last column) must be integers in 0..9")
    images = pixels.reshape(-1, 28, 28)
    if transpose:
        images = images.transpose(0, 2, 1)
    return np.ascontiguousarray(images), labels


def _locate(root: Path, split: str, num_train: int) -> tuple[Path, slice]:
    """The file of a split and the rows to take."""
    if root.is_file() or root.suffix == ".amat":
        return root, slice(None)
    if not root.is_dir():
        raise FileNotFoundError(f"RotMNIST folder not found: {root}")
    name = AMAT_FILES["test" if split == "test" else "train_valid"]
    path = require_file(root / name, f"RotMNIST {split} file")
    if split == "train":
        return path, slice(0, num_train)
    if split == "val":
        return path, slice(num_train, None)
    return path, slice(None)


class RotMNISTAmat(TensorImageDataset):
    """RotMNIST digits ``[1, 28, 28]`` in [0, 1] from the official ``.amat`` files.

    Args:
        root: Folder with the two ``.amat`` files, or one ``.amat`` file.
        split: ``train``, ``val``, ``trainval`` or ``test`` (see the module docstring).
        transpose: Undo the files' column-major storage (see the module docstring).
        num_train: Rows of the train_valid file that form ``train``; the rest is ``val``.
    """

    def __init__(self, root: str | Path, split: str = "train", transpose: bool = True, num_train: int = NUM_TRAIN):
        if split not in ROTMNIST_SPLITS:
            raise ValueError(f"RotMNIST split must be one of {ROTMNIST_SPLITS}, got {split!r}")
        path, rows = _locate(Path(root), split, num_train)
        images, labels = read_amat(path, transpose=transpose)
        indices = np.arange(len(labels))[rows]
        if len(indices) == 0:
            raise ValueError(f"{path}: has {len(labels)} rows, none in split {split!r}")
        identity = {"dataset": "rotmnist", "files": [file_identity(path)], "split": split,
                    "indices_sha256": indices_digest(indices), "transpose": transpose, "num_train": num_train}
        super().__init__(torch.from_numpy(images[indices]).unsqueeze(1), torch.from_numpy(labels[indices]), identity)
