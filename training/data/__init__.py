"""Dataset readers for the files users download: MNIST (IDX, npz), RotMNIST (amat), PCam (HDF5,
image folders) and CIFAR-10 (pickle batches). :func:`build_dataset` is the entry point."""

from training.data.common import TensorImageDataset, dataset_fingerprint, dataset_identity
from training.data.factory import build_dataset, dataset_class, list_datasets

__all__ = ["TensorImageDataset", "build_dataset", "dataset_class", "dataset_fingerprint", "dataset_identity", "list_datasets"]
