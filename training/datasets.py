"""Datasets: a stable import path for the readers in :mod:`training.data`.

Every dataset returns ``(image, label)``: a float tensor ``[C, H, W]`` in [0, 1] and an ``int``.
Build one with ``build_dataset(name, root, split, **options)``; see :mod:`training.data.factory`.
"""

from training.data.common import TensorImageDataset, dataset_fingerprint, dataset_identity
from training.data.factory import build_dataset, dataset_class, list_datasets

__all__ = ["TensorImageDataset", "build_dataset", "dataset_class", "dataset_fingerprint", "dataset_identity", "list_datasets"]
