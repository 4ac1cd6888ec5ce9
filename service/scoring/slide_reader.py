"""Opening slides: any format OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF, ...) through
openslide-python, and plain PNG/JPEG/TIFF images through Pillow.

Every read returns RGB uint8; OpenSlide's transparent pixels (outside the scanned area, or outside
the image) become white, which the tissue detector sees as background.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from service.errors import PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.images import ImageLimits, load_pixels, open_image
from service.scoring.scoring_errors import CorruptInput, InputNotFound, UnsupportedFormat

__all__ = ["Slide", "open_slide", "rgba_to_rgb", "SLIDE_SUFFIXES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_PLAIN_PIXELS = 12_000 * 12_000  # plain images are decoded whole (below Pillow's own bomb limit)
# OpenSlide's decoded-tile cache, per open slide: tiles are read in blocks of about 1024 level pixels
# (see slides._BLOCK_READ_PX), which this holds several times over, so memory does not depend on the slide
SLIDE_CACHE_BYTES = 16 * 1024 * 1024


@dataclass
class Slide:
    """An open slide. ``mpp`` is micrometres per level-0 pixel (None when the file does not say)."""

    path: Path
    handle: openslide.AbstractSlide
    format: str
    mpp: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self.handle.level_downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.handle.level_dimensions)

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """``[height, width, 3]`` uint8 from ``level``, top-left corner at level-0 ``(x0, y0)``."""
        try:
            region = self.handle.read_region((int(x0), int(y0)), int(level), (int(width), int(height)))
        except openslide.OpenSlideError as exc:
            raise CorruptInput(
                f"could not read {width}x{height} pixels at ({x0}, {y0}), level {level} of {self.path.name}: {exc}"
            ) from None
        return rgba_to_rgb(np.asarray(region))

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite (non-premultiplied) RGBA onto white."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def open_slide(path: str | Path, max_plain_pixels: int = DEFAULT_MAX_PLAIN_PIXELS) -> Slide:
    """Open ``path`` with OpenSlide when it recognises the format, else as a plain image.

    Raises:
        InputNotFound, UnsupportedFormat, CorruptInput: with a message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"slide {path} does not exist or is not a file")
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        vendor = None
    if vendor is not None:
        try:
            handle = openslide.OpenSlide(str(path))
            handle.set_cache(openslide.OpenSlideCache(SLIDE_CACHE_BYTES))
        except (openslide.OpenSlideError, OSError) as exc:
            raise CorruptInput(f"{path.name} looks like a {vendor} slide but OpenSlide cannot open it: {exc}") from None
        return Slide(path, handle, vendor, _openslide_mpp(handle))
    return _open_plain(path, max_plain_pixels)


def _openslide_mpp(handle: openslide.OpenSlide) -> float | None:
    props = handle.properties
    try:
        mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(props[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    if not (mpp_x > 0 and mpp_y > 0):
        return None
    if abs(mpp_x - mpp_y) > 0.01 * mpp_x:
        log.warning("slide pixels are not square (%g x %g um); using the mean", mpp_x, mpp_y)
    return (mpp_x + mpp_y) / 2


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff", ".dcm"}


def _looks_like_slide(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return head in _TIFF_MAGIC or path.suffix.lower() in SLIDE_SUFFIXES


def _open_plain(path: Path, max_pixels: int) -> Slide:
    """A PNG/JPEG/TIFF that OpenSlide does not read: decoded whole (these formats have no tiles to
    stream), so its size is bounded by ``max_pixels``."""
    try:
        img = open_image(path, ImageLimits(max_pixels=max_pixels, max_side=max_pixels), path.name)
    except UnsupportedMediaType:
        if _looks_like_slide(path):
            raise CorruptInput(
                f"{path.name} looks like a slide (TIFF-based or a slide extension) but neither OpenSlide nor Pillow "
                "can open it: a damaged or truncated file?"
            ) from None
        raise UnsupportedFormat(
            f"{path.name} is neither a slide OpenSlide reads (SVS, NDPI, MRXS, SCN, tiled TIFF, ...) "
            "nor a PNG, JPEG or TIFF image"
        ) from None
    except PayloadTooLarge as exc:
        raise UnsupportedFormat(
            f"{exc.message}: plain images are decoded whole; convert it to a tiled pyramidal TIFF"
        ) from None
    except ServiceError as exc:
        raise CorruptInput(exc.message) from None
    with img:
        fmt = (img.format or "image").lower()
        try:
            pixels = load_pixels(img, path.name, convert_modes=True)
        except ServiceError as exc:
            raise CorruptInput(f"{exc.message} (a damaged or truncated file?)") from None
    rgb = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).convert("RGB")
    return Slide(path, openslide.ImageSlide(rgb), f"plain-{fmt}", None)
