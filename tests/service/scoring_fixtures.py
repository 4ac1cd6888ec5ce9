"""Fixtures for slide and patch scoring: a small RGB pathology model exported by the project's own
exporter (random weights, seeded: enough for plumbing and equivariance, says nothing of accuracy),
and pyramidal tiled TIFFs written with tifffile that OpenSlide reads.

Imported by ``conftest.py`` so that the session-scoped fixtures are built once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

PATH_MODEL = "path_r4"
NO_MPP_MODEL = "path_nompp"
MODEL_MPP = 1.0  # the synthetic slides are 0.5 um/px: the model reads their level 1 as is
SLIDE_MPP = 0.5


def export_path_model(root: Path) -> Path:
    """``<root>/path_r4/1``: a 16x16 RGB R4 GSA-Net, two classes, card mpp 1.0."""
    import torch

    from training.export import export_model
    from training.networks import GSANetConfig, model_from_config

    torch.manual_seed(0)
    cfg = GSANetConfig(
        group="R4", in_chans=3, num_classes=2, img_size=16, dim=8, num_heads=2, block_sizes=(1, 1),
        expansion=(1, 1), crops=(1, 1), mean=(0.70, 0.54, 0.69), std=(0.23, 0.28, 0.21),
        class_names=("normal", "tumor"),
    )
    net = model_from_config("gsa_test_path_r4", cfg).eval()
    with torch.no_grad():  # the readout sums over positions: shrink the head so probabilities are not all 0 or 1
        net.head.weight.mul_(0.02)
    export_model(net, root, PATH_MODEL, "1", mpp=MODEL_MPP, features=True, command="tests/service/scoring_fixtures.py")
    return root / PATH_MODEL / "1"


@pytest.fixture(scope="session")
def path_model_repo(tmp_path_factory) -> Path:
    """A model repository with ``path_r4/1`` and ``path_nompp/1`` (the same graph, card without mpp)."""
    root = tmp_path_factory.mktemp("path_models")
    src = export_path_model(root)
    dst = root / NO_MPP_MODEL / "1"
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card.update({"name": NO_MPP_MODEL, "mpp": None})
    (dst / "card.json").write_text(json.dumps(card))
    return root


@pytest.fixture(scope="session")
def path_model(path_model_repo):
    from service.score import load_model

    return load_model(path_model_repo, PATH_MODEL, None, threads=1)


def tissue_image(height: int, width: int, seed: int = 0, blank_right: float = 1 / 3) -> np.ndarray:
    """White glass with stained 'tissue' (saturated pink and purple texture) in ellipses over the left
    part; the right ``blank_right`` of the width is empty glass."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 240, np.uint8)
    img += rng.integers(0, 12, img.shape, dtype=np.uint8)  # glass noise, unsaturated
    yy, xx = np.mgrid[0:height, 0:width]
    usable = int(width * (1 - blank_right))
    tissue = np.zeros((height, width), bool)
    for _ in range(6 if usable > 0 else 0):
        cy, cx = rng.integers(0, height), rng.integers(0, usable)
        ry, rx = rng.integers(height // 8, height // 3), rng.integers(usable // 8, usable // 3)
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    tissue[:, usable:] = False
    pink = np.stack([rng.integers(150, 240, (height, width)), rng.integers(40, 140, (height, width)),
                     rng.integers(110, 200, (height, width))], -1).astype(np.uint8)
    img[tissue] = pink[tissue]
    return img


def block_mean2(img: np.ndarray) -> np.ndarray:
    """2x2 block mean, rounded half up: commutes with 90-degree rotations (even sizes)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    s = img[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def pyramid(img: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    out = [img]
    for _ in range(levels - 1):
        out.append(block_mean2(out[-1]))
    return out


def write_pyramidal_tiff(path: Path, img: np.ndarray, mpp: float | None = SLIDE_MPP, levels: int = 3,
                         tile: int = 128) -> Path:
    """A tiled pyramidal TIFF (one IFD per level, reduced ones flagged) that OpenSlide reads as
    'generic-tiff'; the resolution tags (pixels per centimetre) give OpenSlide its mpp."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pyramid(img, levels)):
            kwargs = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * 2 ** i)
                kwargs = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=1 if i else 0, **kwargs)
    return path


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory) -> dict[str, Path]:
    """``slide``: 1024x768 px at 0.5 um/px (32x24 tiles of 16 model pixels); ``rotated``: the same
    rotated by 90 degrees counter-clockwise (768x1024); ``nompp``: the same without resolution tags."""
    root = tmp_path_factory.mktemp("slides")
    img = tissue_image(768, 1024)
    return {
        "image": img,
        "slide": write_pyramidal_tiff(root / "synthetic.tiff", img),
        "rotated": write_pyramidal_tiff(root / "synthetic_rot90.tiff", np.ascontiguousarray(np.rot90(img))),
        "nompp": write_pyramidal_tiff(root / "synthetic_nompp.tiff", img, mpp=None),
    }
