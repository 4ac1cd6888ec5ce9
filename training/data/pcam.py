"""PatchCamelyon (Veeling et al. 2018): 96x96 RGB H&E patches, label 1 = tumour in the centre 32x32.

Two layouts are read:

- the official HDF5 files ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (``x``: uint8
  ``[N, 96, 96, 3]``, ``y``: uint8 ``[N, 1, 1, 1]``), read lazily: each worker process opens the
  file itself on first access and reads one patch per index (the training split is 7 GB);
- an image folder, ``root/{split}/{0,1}/*.jpg`` or ``root/{split}/{no_tumor,tumor}/*``; a ``root``
  holding the class folders directly is one set, read with split ``all``.

Splits are ``train``, ``valid`` (also ``val``) and ``test``, as PCam defines them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.common import file_identity, require_file

__all__ = ["PCamH5", "PCamFolder", "open_pcam", "h5_paths", "CLASS_FOLDERS", "PCAM_CLASS_NAMES"]

PCAM_CLASS_NAMES = ("normal", "tumor")
CLASS_FOLDERS = {"0": 0, "1": 1, "no_tumor": 0, "tumor": 1, "normal": 0}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
_SPLIT_ALIASES = {"train": ("train",), "val": ("valid", "val"), "valid": ("valid", "val"), "test": ("test",)}


def _split_name(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"PCam split must be one of {sorted(_SPLIT_ALIASES)}, got {split!r}")
    return _SPLIT_ALIASES[split][0]


def h5_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """Paths of the official ``x`` and ``y`` HDF5 files of a split (they may not exist)."""
    name = _split_name(split)
    root = Path(root)
    return (root / f"camelyonpatch_level_2_split_{name}_x.h5", root / f"camelyonpatch_level_2_split_{name}_y.h5")


def _open_h5(path: Path, key: str) -> tuple[Any, Any]:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    if key not in handle:
        keys = list(handle.keys())
        handle.close()
        raise ValueError(f"{path}: has no dataset {key!r} (has {keys})")
    return handle, handle[key]


class PCamH5(Dataset):
    """PCam patches ``[3, 96, 96]`` in [0, 1] from the official HDF5 files, read lazily.

    Args:
        root: Folder with the ``camelyonpatch_level_2_split_*`` files (decompressed).
        split: ``train``, ``valid`` (``val``) or ``test``.
    """

    class_names = PCAM_CLASS_NAMES

    def __init__(self, root: str | Path, split: str = "train"):
        self.split = _split_name(split)
        x_path, y_path = h5_paths(root, split)
        for path in (x_path, y_path):
            if not path.is_file() and Path(f"{path}.gz").is_file():
                raise FileNotFoundError(f"{path} not found, but {path}.gz is: decompress it first (gunzip)")
            require_file(path, f"PCam {self.split} HDF5 file")
        handle, x = _open_h5(x_path, "x")
        with handle:
            if x.ndim != 4 or x.shape[1:] != (96, 96, 3) or x.dtype != np.uint8:
                raise ValueError(f"{x_path}: expected 'x' uint8 [N, 96, 96, 3], got {x.dtype} {x.shape}")
            n = x.shape[0]
        handle, y = _open_h5(y_path, "y")
        with handle:
            if y.shape[0] != n or int(np.prod(y.shape[1:])) != 1:
                raise ValueError(f"{y_path}: expected 'y' [{n}, 1, 1, 1], got {y.shape}")
            labels = np.asarray(y[:]).reshape(-1).astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() > 1):
            raise ValueError(f"{y_path}: labels must be 0 or 1")
        self.x_path, self.y_path = x_path, y_path
        self.labels = torch.from_numpy(labels)
        self._handle: Any = None
        self._x: Any = None
        self._pid: int | None = None

    @staticmethod
    def present(root: str | Path, split: str) -> bool:
        """Whether ``root`` holds the HDF5 files (or their ``.gz``) of ``split``."""
        return any(p.is_file() or Path(f"{p}.gz").is_file() for p in h5_paths(root, split))

    def _images(self) -> Any:
        if self._x is None or self._pid != os.getpid():  # one handle per (worker) process
            self._handle, self._x = _open_h5(self.x_path, "x")
            self._pid = os.getpid()
        return self._x

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _x=None, _pid=None)  # h5py handles do not cross processes
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patch = np.asarray(self._images()[index])  # 96, 96, 3
        return torch.from_numpy(patch).permute(2, 0, 1).float().div_(255.0), int(self.labels[index])

    def identity(self) -> dict[str, Any]:
        return {"dataset": "pcam_h5", "split": self.split,
                "files": [file_identity(self.x_path), file_identity(self.y_path)]}


def _folder_of(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"PCam image folder not found: {root}")
    if split == "all":
        return root
    for name in _SPLIT_ALIASES.get(split, ()):
        if (root / name).is_dir():
            return root / name
    _split_name(split)  # raises on an unknown split name
    raise FileNotFoundError(f"PCam split folder not found: {root / _split_name(split)} "
                            "(expected root/{train,valid,test}/{0,1}/...; use split 'all' for root/{0,1}/...)")


class PCamFolder(Dataset):
    """PCam patches ``[3, H, W]`` in [0, 1] from an image-folder tree (decoded on access).

    Args:
        root: Folder with ``{train,valid,test}/{0,1}/`` (or ``no_tumor``/``tumor``) sub-folders,
            or the class folders themselves (split ``all``).
        split: ``train``, ``valid`` (``val``), ``test`` or ``all``.
    """

    class_names = PCAM_CLASS_NAMES

    def __init__(self, root: str | Path, split: str = "train"):
        self.split = split
        self.folder = _folder_of(Path(root), split)
        subdirs = sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [p.name for p in subdirs if p.name not in CLASS_FOLDERS]
        if unknown or not subdirs:
            raise ValueError(f"{self.folder}: expected class folders among {sorted(CLASS_FOLDERS)}, "
                             f"found {[p.name for p in subdirs]}")
        self.samples: list[tuple[Path, int]] = []
        for sub in subdirs:
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            self.samples += [(p, CLASS_FOLDERS[sub.name]) for p in files]
        if not self.samples:
            raise ValueError(f"{self.folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
        self.labels = torch.tensor([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))  # H, W, 3
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: cannot decode image ({exc})") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0), label

    def identity(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        total = 0
        for path, label in self.samples:
            size = path.stat().st_size
            total += size
            digest.update(f"{path.relative_to(self.folder)}\t{size}\t{label}\n".encode())
        return {"dataset": "pcam_folder", "split": self.split, "count": len(self.samples),
                "total_bytes": total, "files_sha256": digest.hexdigest()}


def open_pcam(root: str | Path, split: str = "train") -> Dataset:
    """PCam from whichever layout ``root`` holds: HDF5 files if present, else an image folder."""
    return PCamH5(root, split) if split != "all" and PCamH5.present(root, split) else PCamFolder(root, split)
