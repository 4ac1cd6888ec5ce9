"""``build_dataset(name, root, split, **options)``: one entry point for every dataset reader.

Names:
    ``mnist``: MNIST from an ``.npz`` or IDX files, rotated by seeded random angles
    (:class:`~training.data.mnist.MNISTDataset`; ``rotate=False`` for plain MNIST).
    ``rotmnist``: the official RotMNIST ``.amat`` files (:class:`~training.data.rotmnist.RotMNISTAmat`).
    ``pcam``: PatchCamelyon, HDF5 files or an image-folder tree, whichever ``root`` holds.
    ``pcam_h5`` / ``pcam_folder``: PatchCamelyon from that format only.
    ``cifar10``: CIFAR-10 python pickle batches (:class:`~training.data.cifar.CIFAR10Batches`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

__all__ = ["build_dataset", "list_datasets", "dataset_class"]


def _mnist() -> type:
    from training.data.mnist import MNISTDataset
    return MNISTDataset


def _rotmnist() -> type:
    from training.data.rotmnist import RotMNISTAmat
    return RotMNISTAmat


def _pcam_h5() -> type:
    from training.data.pcam import PCamH5
    return PCamH5


def _pcam_folder() -> type:
    from training.data.pcam import PCamFolder
    return PCamFolder


def _pcam() -> type:
    from training.data.pcam import PCamH5, PCamFolder

    class _Auto:  # picks the reader from what root holds
        def __new__(cls, root: str | Path, split: str = "train", **options: Any):
            reader = PCamH5 if PCamH5.present(root, split) else PCamFolder
            return reader(root, split, **options)

    _Auto.__init__ = PCamFolder.__init__  # type: ignore[misc]  # options are checked against the folder reader
    return _Auto


def _cifar10() -> type:
    from training.data.cifar import CIFAR10Batches
    return CIFAR10Batches


_DATASETS: dict[str, Callable[[], type]] = {
    "mnist": _mnist,
    "rotmnist": _rotmnist,
    "pcam": _pcam,
    "pcam_h5": _pcam_h5,
    "pcam_folder": _pcam_folder,
    "cifar10": _cifar10,
}


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_class(name: str) -> type:
    """The reader class of a dataset name (imports its module on demand)."""
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
    cls = dataset_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root", "split"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"dataset {name!r} has no options {sorted(unknown)}; it accepts {sorted(accepted)}")
    return cls(root, split, **options)
