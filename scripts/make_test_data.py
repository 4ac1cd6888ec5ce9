"""Put the real data the tests use in place, from the official downloads (nothing is downloaded here).

    python scripts/make_test_data.py mnist DIR     # DIR holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]
    python scripts/make_test_data.py pcam DIR      # DIR holds camelyonpatch_level_2_split_{train,valid}_{x,y}.h5
    python scripts/make_test_data.py slide FILE    # CMU-1-Small-Region.svs

writes, under ``$GSA_TEST_DATA`` (default ``../shared/data`` beside the checkout; ``--out`` overrides):

- ``mnist/mnist-train-10k.npz``: the first 10,000 training digits, ``images`` uint8 [N, 28, 28] and
  ``labels`` uint8 [N];
- ``pcam-subset/{train,valid}/{0,1}/patchNNNNNNN.jpg``: the first 10,000 patches of each class of
  the training split and 1,500 of the validation split, JPEG quality 75, named by their index in
  the split;
- ``slides/cmu_small_region.svs``: a copy of the slide.

Where each download comes from is in ``tests/data_paths.py`` (and the README). Needs the training
extra (numpy, h5py, Pillow, torch for the readers in ``training.data``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from data_paths import MNIST, PCAM, SLIDE, SOURCES, data_root  # noqa: E402

PCAM_COUNTS = {"train": 10_000, "valid": 1_500}  # patches per class


def make_mnist(source: Path, out: Path, count: int = 10_000) -> Path:
    """The first ``count`` training digits of the IDX files in ``source`` as one ``.npz``."""
    from training.data.mnist import find_idx_pair, read_idx

    images_path, labels_path = find_idx_pair(source, "train")
    images, labels = read_idx(images_path)[:count], read_idx(labels_path)[:count]
    target = out / MNIST
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, images=images.astype(np.uint8), labels=labels.astype(np.uint8))
    return target


def make_pcam(source: Path, out: Path, counts: dict[str, int] = PCAM_COUNTS) -> Path:
    """The first ``counts[split]`` patches of each class of the official HDF5 files as JPEG folders."""
    import h5py
    from PIL import Image

    from training.data.pcam import h5_paths

    for split, per_class in counts.items():
        x_path, y_path = h5_paths(source, split)
        for path in (x_path, y_path):
            if not path.is_file():
                raise SystemExit(f"{path} not found ({'gunzip it first' if Path(f'{path}.gz').is_file() else SOURCES[PCAM]})")
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            x, y = fx["x"], fy["y"][:].reshape(-1)
            for label in (0, 1):
                folder = out / PCAM / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                for index in np.flatnonzero(y == label)[:per_class]:
                    Image.fromarray(x[int(index)]).save(folder / f"patch{int(index):07d}.jpg", quality=75)
    return out / PCAM


def make_slide(source: Path, out: Path) -> Path:
    """A copy of OpenSlide's CMU-1-Small-Region.svs under the name the tests read."""
    if not source.is_file():
        raise SystemExit(f"{source} not found: {SOURCES[SLIDE]}")
    target = out / SLIDE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["mnist", "pcam", "slide"])
    parser.add_argument("source", type=Path, help="the folder of the downloads (mnist, pcam) or the slide file")
    parser.add_argument("--out", type=Path, default=None, help="data root (default: $GSA_TEST_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    out = args.out or data_root()
    made = {"mnist": make_mnist, "pcam": make_pcam, "slide": make_slide}[args.what](args.source, out)
    print(f"wrote {made}")


if __name__ == "__main__":
    main()
