"""``build_dataset(name, root, split, **options)``: one entry point for every dataset reader.

Names:
    ``mnist``: MNIST from an ``.npz`` or IDX files, rotated by seeded random angles
    (:class:`~training.data.mnist.MNISTDataset`; ``rotate=False`` for plain MNIST).
    ``rotmnist``: the official RotMNIST ``.amat`` files (:class:`~training.data.rotmnist.RotMNISTAmat`).
    ``pcam``: PatchCamelyon, HDF5 files or an image-folder tree, whichever ``root`` holds
    (:func:`~training.data.pcam.open_pcam`).
    ``pcam_h5`` / ``pcam_folder``: PatchCamelyon from that format only.
    ``cifar10``: CIFAR-10 python pickle batches (:class:`~training.data.cifar.CIFAR10Batches`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

__all__ = ["build_dataset", "list_datasets", "dataset_class"]


def _mnist() -> Callable[..., Dataset]:
    from training.data.mnist import MNISTDataset
    return MNISTDataset


def _rotmnist() -> Callable[..., Dataset]:
    from training.data.rotmnist import RotMNISTAmat
    return RotMNISTAmat


def _pcam() -> Callable[..., Dataset]:
    from training.data.pcam import open_pcam
    return open_pcam


def _pcam_h5() -> Callable[..., Dataset]:
    from training.data.pcam import PCamH5
    return PCamH5


def _pcam_folder() -> Callable[..., Dataset]:
    from training.data.pcam import PCamFolder
    return PCamFolder


def _cifar10() -> Callable[..., Dataset]:
    from training.data.cifar import CIFAR10Batches
    return CIFAR10Batches


_DATASETS: dict[str, Callable[[], Callable[..., Dataset]]] = {
    "mnist": _mnist,
    "rotmnist": _rotmnist,
    "pcam": _pcam,
    "pcam_h5": _pcam_h5,
    "pcam_folder": _pcam_folder,
    "cifar10": _cifar10,
}


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_class(name: str) -> Callable[..., Dataset]:
    """The reader (class or function) of a dataset name; imports its module on demand."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _DATASETS[name]()


def build_dataset(name: str, root: str | Path, split: str, **options: Any) -> Dataset:
    """Build dataset ``name`` from the files under ``root`` for ``split``.

    Args:
        name: A name of :func:`list_datasets`.
        root: The file or directory the reader expects.
        split: The split (``train``, ``val``, ``test``, ... as the reader defines them).
        **options: Reader-specific options (``val_size``, ``rotation_seed``, ...).

    Raises:
        ValueError: Unknown name or option, or malformed data.
        FileNotFoundError: Missing files.
    """
    reader = dataset_class(name)
    accepted = set(inspect.signature(reader).parameters) - {"root", "split"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"dataset {name!r} has no options {sorted(unknown)}; it accepts {sorted(accepted) or 'none'}")
    return reader(root, split, **options)
