"""Where the tests find real data: one setting, the environment variable ``GSA_TEST_DATA``.

It names a folder laid out as below; unset, it is ``../shared/data`` beside the checkout. A test
whose file is missing skips, and its message says which file and how to get it.

    GSA_TEST_DATA/
      mnist/mnist-train-10k.npz                 MNIST training digits: images uint8 [N, 28, 28], labels [N]
      pcam-subset/{train,valid}/{0,1}/*.jpg      PatchCamelyon patches, 96x96 RGB, by label
      slides/cmu_small_region.svs               OpenSlide's test slide CMU-1-Small-Region.svs

``python scripts/make_test_data.py`` builds this layout from the official downloads. The
pytest ``pythonpath`` setting (pyproject.toml) makes this module importable from every test.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "MNIST", "PCAM", "SLIDE", "SOURCES", "data_root", "data_path", "missing_reason", "require"]

ENV = "GSA_TEST_DATA"
ROOT = Path(__file__).resolve().parents[1]

MNIST = "mnist/mnist-train-10k.npz"
PCAM = "pcam-subset"
SLIDE = "slides/cmu_small_region.svs"

# what each entry is, where it comes from, and the command that puts it in place
SOURCES = {
    MNIST: (
        "the first 10,000 MNIST training digits as .npz (images uint8 [N, 28, 28], labels uint8 [N]); "
        "download train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz from MNIST "
        "(https://yann.lecun.com/exdb/mnist/) into DIR, then: python scripts/make_test_data.py mnist DIR"
    ),
    PCAM: (
        "PatchCamelyon patches as JPEG class folders (train 10,000 + 10,000, valid 1,500 + 1,500); "
        "download camelyonpatch_level_2_split_{train,valid}_{x,y}.h5.gz (PCam release, "
        "https://github.com/basveeling/pcam, Zenodo record 2546921) into DIR, gunzip them, then: "
        "python scripts/make_test_data.py pcam DIR"
    ),
    SLIDE: (
        "OpenSlide's test slide CMU-1-Small-Region.svs (Aperio, 1.9 MB; "
        "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/), then: "
        "python scripts/make_test_data.py slide CMU-1-Small-Region.svs"
    ),
}


def data_root() -> Path:
    """``$GSA_TEST_DATA``, else ``../shared/data`` beside the checkout."""
    value = os.environ.get(ENV)
    return Path(value).expanduser() if value else ROOT.parent / "shared" / "data"


def data_path(name: str) -> Path:
    """The path of one entry of ``SOURCES`` (``MNIST``, ``PCAM``, ``SLIDE``) under the data root."""
    return data_root() / name


def missing_reason(name: str) -> str:
    """Which file is missing, where it was looked for, and how to get it."""
    setting = f"{ENV}={os.environ[ENV]}" if os.environ.get(ENV) else f"{ENV} unset, so ../shared/data"
    return f"{data_path(name)} not found ({setting}): {SOURCES[name]}"


def require(name: str) -> Path:
    """The entry's path; skips the calling test, saying how to get the file, when it is not there."""
    __tracebackhide__ = True  # the skip is reported at the test's line, not here
    path = data_path(name)
    if not path.exists():
        import pytest

        pytest.skip(missing_reason(name))
    return path
