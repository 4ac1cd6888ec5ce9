"""Dataset readers: every format written here in miniature, malformed files, and the real data."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from data_paths import MNIST, PCAM, require
from PIL import Image
from torch.utils.data import DataLoader

from training.data.cifar import CIFAR10Batches, read_cifar_batch
from training.data.common import dataset_fingerprint, seeded_split
from training.data.factory import build_dataset, list_datasets
from training.data.mnist import MNISTDataset, read_idx
from training.data.pcam import PCamFolder, PCamH5, h5_paths, open_pcam
from training.data.rotmnist import AMAT_FILES, RotMNISTAmat, read_amat
from training.data.transforms import RGB_FROM_HED, hed_jitter, random_d4, rotate_bilinear, rotate_quarter_turns


def _digits(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _check_item(dataset, shape: tuple[int, ...]) -> None:
    image, label = dataset[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == shape
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int)


# ---- rotations -------------------------------------------------------------------------------
def test_bilinear_rotation_by_quarter_turns_matches_rot90():
    x = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        assert torch.allclose(rotate_bilinear(x, k * math.pi / 2), rotate_quarter_turns(x, k), atol=1e-5)


def test_rotation_sense_is_counter_clockwise():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 4] = 1.0  # top right corner
    assert rotate_quarter_turns(x, 1)[0, 0, 0, 0] == 1.0  # -> top left
    assert rotate_bilinear(x, torch.tensor([math.pi / 2]))[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(rotate_bilinear(x, math.pi / 4), x)


# ---- MNIST: npz and IDX ----------------------------------------------------------------------
@pytest.fixture()
def mnist_npz(tmp_path):
    images, labels = _digits(40)
    path = tmp_path / "mnist.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


def test_rotation_builds_its_grid_on_the_images_device():
    """A scalar angle used to make the sampling grid on the CPU, so evaluating rotations of CUDA
    tensors failed; the meta device stands in for a GPU here."""
    x = torch.rand(3, 1, 8, 8, device="meta")
    assert rotate_bilinear(x, math.pi / 4).device == x.device
    assert rotate_bilinear(x, torch.full((3,), 0.5)).device == x.device


def test_random_d4_draws_exact_elements_uniformly():
    """Each image comes out as one of its 8 D4 images (quarter turns, mirrored or not), exactly;
    all 8 occur, and the draws follow the generator's seed."""
    x = torch.rand(400, 3, 6, 6)
    out = random_d4(x, torch.Generator().manual_seed(1))
    seen = set()
    for img, res in zip(x, out):
        matches = [(k, m) for m in (False, True) for k in range(4)
                   if torch.equal(res, (rotate_quarter_turns(img, k).flip(-1) if m else rotate_quarter_turns(img, k)))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 8
    assert torch.equal(out, random_d4(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, random_d4(x, torch.Generator().manual_seed(2)))


def test_hed_jitter():
    """sigma 0 returns the image (unmix and mix are inverses); a stain's optical density scales by
    its factor; the output stays in [0, 1]; it needs RGB."""
    rng = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 5, 5) * 0.9 + 0.05
    torch.testing.assert_close(hed_jitter(x, 0.0, rng), x, rtol=1e-4, atol=1e-5)
    # pure haematoxylin of density 1 (optical density along H's stain vector): unmixed again, the
    # H density is a * 1 + b and the E and D densities are b alone, |a - 1| <= sigma, |b| <= sigma
    sigma = 0.05
    pure_h = torch.exp(-RGB_FROM_HED[0].float())[None, :, None, None].expand(6, 3, 2, 2).contiguous()
    out = hed_jitter(pure_h, sigma, torch.Generator().manual_seed(3))
    stains = -torch.log(out[:, :, 0, 0]).double() @ torch.linalg.inv(RGB_FROM_HED)  # 6, 3 (H, E, D)
    assert ((stains[:, 0] >= 1 - 2 * sigma - 1e-4) & (stains[:, 0] <= 1 + 2 * sigma + 1e-4)).all()
    assert (stains[:, 1:].abs() <= sigma + 1e-4).all()
    assert stains[:, 0].std() > 1e-3  # each image gets its own factors
    y = hed_jitter(torch.rand(16, 3, 8, 8), 0.3, rng)
    assert y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="RGB"):
        hed_jitter(torch.rand(2, 1, 4, 4), 0.05, rng)


def test_seeded_split_partitions():
    train, val = seeded_split(50, 10, 3, "train"), seeded_split(50, 10, 3, "val")
    assert len(val) == 10 and sorted(np.concatenate([train, val]).tolist()) == list(range(50))
    assert not np.array_equal(val, seeded_split(50, 10, 4, "val"))
    assert not np.array_equal(val, np.arange(10)), "the split must be a permutation, not a slice"


def test_mnist_npz_splits_and_rotation(mnist_npz):
    path, images, labels = mnist_npz
    train = MNISTDataset(path, "train", val_size=8, split_seed=1, rotation_seed=5)
    val = MNISTDataset(path, "val", val_size=8, split_seed=1, rotation_seed=5)
    assert len(train) == 32 and len(val) == 8
    assert set(train.indices).isdisjoint(val.indices)
    _check_item(train, (1, 28, 28))
    angles = torch.cat([train.angles, val.angles])
    assert float(angles.min()) >= 0 and float(angles.max()) < 2 * math.pi and angles.std() > 0.5
    i = int(val.indices[3])
    plain = torch.from_numpy(images[i : i + 1].astype(np.float32) / 255).unsqueeze(1)
    expected = rotate_bilinear(plain, val.angles[3:4]).clamp(0, 1)[0]
    assert torch.allclose(val[3][0], expected) and val[3][1] == labels[i]
    again = MNISTDataset(path, "val", val_size=8, split_seed=1, rotation_seed=5)
    assert torch.equal(again.images, val.images)
    other = MNISTDataset(path, "val", val_size=8, split_seed=1, rotation_seed=6)
    assert not torch.equal(other.images, val.images)


def test_mnist_unrotated_is_exact(mnist_npz):
    path, images, labels = mnist_npz
    ds = MNISTDataset(path, "all", rotate=False)
    assert len(ds) == 40
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
    assert [ds[i][1] for i in range(40)] == labels.tolist()


def test_mnist_npz_errors(tmp_path, mnist_npz):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        MNISTDataset(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match=r"bad\.npz.*missing arrays \['images'\]"):
        MNISTDataset(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        MNISTDataset(bad)
    with pytest.raises(ValueError, match="no 'test' split"):
        MNISTDataset(mnist_npz[0], "test")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_plain_and_gzip(tmp_path):
    images, labels = _digits(30, seed=1)
    test_images, test_labels = _digits(6, seed=2)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    test = MNISTDataset(tmp_path, "test", rotate=False)
    assert torch.equal(test.images[:, 0], torch.from_numpy(test_images / np.float32(255)))
    assert MNISTDataset(tmp_path, "val", val_size=5).labels.tolist() == labels[seeded_split(30, 5, 0, "val")].tolist()


def test_idx_errors(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*holds 100"):
        read_idx(path)
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="train labels"):
        MNISTDataset(tmp_path, "train")


# ---- RotMNIST .amat --------------------------------------------------------------------------
def _write_amat(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # The LISA-lab files store each image column by column: write the transpose row-major.
    rows = [" ".join(f"{v:.6e}" for v in img.T.reshape(-1)) + f" {lab:.6e}" for img, lab in zip(images, labels)]
    path.write_text("\n".join(rows) + "\n")


def test_rotmnist_amat_orientation_and_splits(tmp_path):
    images = (np.random.default_rng(0).random((7, 28, 28)) ** 4).astype(np.float32)
    labels = np.arange(7) % 10
    _write_amat(tmp_path / AMAT_FILES["train_valid"], images[:5], labels[:5])
    _write_amat(tmp_path / AMAT_FILES["test"], images[5:], labels[5:])
    read, read_labels = read_amat(tmp_path / AMAT_FILES["train_valid"])
    assert np.allclose(read, images[:5], atol=1e-6) and read_labels.tolist() == labels[:5].tolist()
    mirrored, _ = read_amat(tmp_path / AMAT_FILES["train_valid"], transpose=False)
    assert np.allclose(mirrored, images[:5].transpose(0, 2, 1), atol=1e-6)
    train = RotMNISTAmat(tmp_path, "train", num_train=3)
    val = RotMNISTAmat(tmp_path, "val", num_train=3)
    test = build_dataset("rotmnist", tmp_path, "test")
    assert (len(train), len(val), len(test)) == (3, 2, 2)
    _check_item(test, (1, 28, 28))
    assert torch.allclose(val[1][0][0], torch.from_numpy(images[4]), atol=1e-6) and val[1][1] == 4


@pytest.mark.parametrize(
    "text, match",
    [("0.5 " * 784 + "3.5\n", "integers in 0..9"), ("0.5 " * 700 + "3\n", "785 numbers"),
     ("2.0 " * 784 + "3\n", r"outside \[0, 1\]"), ("abc def\n", "not an .amat matrix"), ("", "no rows")],
)
def test_rotmnist_amat_errors(tmp_path, text, match):
    path = tmp_path / "broken.amat"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"broken.amat.*{match}"):
        read_amat(path)


def test_rotmnist_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_all_rotation_normalized_float_test.amat"):
        RotMNISTAmat(tmp_path, "test")


# ---- PCam HDF5 and folders -------------------------------------------------------------------
def _write_pcam_h5(root: Path, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (n, 1, 1, 1), dtype=np.uint8)
    x_path, y_path = h5_paths(root, split)
    with h5py.File(x_path, "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(y_path, "w") as f:
        f.create_dataset("y", data=y)
    return x, y


def test_pcam_h5_reads_lazily_and_in_workers(tmp_path):
    x, y = _write_pcam_h5(tmp_path, "valid", 6)
    ds = build_dataset("pcam_h5", tmp_path, "val")
    assert len(ds) == 6 and ds._x is None, "the HDF5 file must be opened on first access, not at construction"
    image, label = ds[4]
    assert torch.equal(image, torch.from_numpy(x[4]).permute(2, 0, 1).float() / 255) and label == int(y[4, 0, 0, 0])
    batches = list(DataLoader(ds, batch_size=3, num_workers=1))  # pickled into a worker after an access
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(y.reshape(-1).astype(np.int64)))
    assert isinstance(open_pcam(tmp_path, "valid"), PCamH5)


def test_pcam_h5_errors(tmp_path):
    x_path, y_path = h5_paths(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="camelyonpatch_level_2_split_test_x.h5"):
        PCamH5(tmp_path, "test")
    with gzip.open(f"{x_path}.gz", "wb") as f:
        f.write(b"compressed")
    with pytest.raises(FileNotFoundError, match="gunzip"):
        PCamH5(tmp_path, "test")
    _write_pcam_h5(tmp_path, "test", 3)
    with h5py.File(y_path, "w") as f:
        f.create_dataset("y", data=np.zeros((2, 1, 1, 1), np.uint8))
    with pytest.raises(ValueError, match=r"split_test_y.h5.*\[3, 1, 1, 1\]"):
        PCamH5(tmp_path, "test")
    x_path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="split_test_x.h5: not a readable HDF5"):
        PCamH5(tmp_path, "test")


def _write_folder(root: Path, classes: tuple[str, str], n: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    written = {}
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            array = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"patch{i}.png")
            written[f"{cls}/patch{i}.png"] = array
    return written


@pytest.mark.parametrize("classes", [("0", "1"), ("no_tumor", "tumor")])
def test_pcam_folder(tmp_path, classes):
    written = _write_folder(tmp_path / "train", classes)
    _write_folder(tmp_path / "valid", classes, n=1)
    ds = build_dataset("pcam", tmp_path, "train")
    assert isinstance(ds, PCamFolder) and len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
    image, label = ds[3]
    assert torch.equal(image, torch.from_numpy(written[f"{classes[1]}/patch1.png"]).permute(2, 0, 1).float() / 255)
    assert len(PCamFolder(tmp_path, "val")) == 2
    assert len(PCamFolder(tmp_path / "train", "all")) == 4


def test_pcam_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        PCamFolder(tmp_path, "test")
    (tmp_path / "train" / "maybe").mkdir(parents=True)
    with pytest.raises(ValueError, match="expected class folders.*maybe"):
        PCamFolder(tmp_path, "train")
    (tmp_path / "train" / "maybe").rmdir()
    (tmp_path / "train" / "1").mkdir()
    (tmp_path / "train" / "1" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = PCamFolder(tmp_path, "train")
    with pytest.raises(ValueError, match="broken.jpg: cannot decode"):
        ds[0]


# ---- CIFAR-10 pickle batches -----------------------------------------------------------------
def _write_cifar(root: Path, n: int = 4, protocol: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    everything = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        everything.append(data)
        batch = {b"batch_label": name.encode(), b"labels": list(rng.integers(0, 10, n).tolist()), b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return np.stack(everything)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches(tmp_path, protocol):
    data = _write_cifar(tmp_path, protocol=protocol)
    train = build_dataset("cifar10", tmp_path, "train", val_size=5, split_seed=0)
    val = CIFAR10Batches(tmp_path, "val", val_size=5)
    test = CIFAR10Batches(tmp_path, "test")
    assert (len(train), len(val), len(test)) == (15, 5, 4)
    _check_item(test, (3, 32, 32))
    assert torch.equal(test[2][0], torch.from_numpy(data[5, 2].reshape(3, 32, 32)).float() / 255)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to load .*system"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_1: expected data uint8 \[N, 3072\]"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    assert read_cifar_batch(path)[0].shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        CIFAR10Batches(tmp_path, "train")


# ---- factory and fingerprints ----------------------------------------------------------------
def test_factory_rejects_unknown_names_and_options(mnist_npz):
    assert {"mnist", "rotmnist", "pcam", "pcam_h5", "pcam_folder", "cifar10"} <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        build_dataset("svhn", mnist_npz[0], "train")
    with pytest.raises(ValueError, match=r"no options \['rotation_sed'\]"):
        build_dataset("mnist", mnist_npz[0], "train", val_size=8, rotation_sed=1)


def test_fingerprint_covers_files_splits_and_seeds(mnist_npz, tmp_path):
    path = mnist_npz[0]

    def fp(**kw):
        opts = {"val_size": 8, "split_seed": 0, "rotation_seed": 0, **kw}
        return dataset_fingerprint(train=MNISTDataset(path, "train", **opts), val=MNISTDataset(path, "val", **opts))

    base = fp()
    assert base == fp()
    assert len({base, fp(split_seed=1), fp(rotation_seed=1), fp(val_size=9)}) == 4
    images, labels = _digits(41)
    np.savez(path, images=images, labels=labels)  # same name, different size
    assert fp() != base


# ---- the real data (GSA_TEST_DATA, see tests/data_paths.py) ----------------------------------
def test_real_mnist_npz():
    real_mnist = require(MNIST)
    train = build_dataset("mnist", real_mnist, "train")
    val = build_dataset("mnist", real_mnist, "val")
    assert (len(train), len(val)) == (9000, 1000)
    assert set(train.indices).isdisjoint(val.indices)
    counts = torch.bincount(val.labels, minlength=10)
    assert int(counts.min()) > 50, "validation must mix every class (the file is grouped by class)"
    _check_item(val, (1, 28, 28))
    assert 0.05 < float(val.images.mean()) < 0.25


def test_real_pcam_folder():
    val = build_dataset("pcam", require(PCAM), "valid")
    assert len(val) == 3000 and int(val.labels.sum()) == 1500
    _check_item(val, (3, 96, 96))
    assert val.identity()["count"] == 3000
