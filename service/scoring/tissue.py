"""Tissue detection on a thumbnail: Otsu's threshold on HSV saturation (stained tissue is
coloured, glass and background are grey or white).

The thumbnail is built in chunks from the coarsest level that is fine enough, each chunk reduced
with a box filter, so no level is ever read whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.scoring.slide_reader import Slide

__all__ = ["TissueMask", "detect_tissue", "otsu_threshold", "saturation"]

_CHUNK_READ_PX = 1024  # pixels a side read at once while building the thumbnail (4 MiB of RGBA)


@dataclass
class TissueMask:
    """``mask[y, x]`` for the thumbnail pixel covering level-0 ``[x*scale, (x+1)*scale)``."""

    mask: np.ndarray  # bool [mh, mw]
    thumbnail: np.ndarray  # uint8 [mh, mw, 3]
    scale: int  # level-0 pixels per thumbnail pixel
    threshold: float  # saturation threshold (0..255), NaN when detection is off
    method: str

    def __post_init__(self) -> None:
        m = self.mask.astype(np.int64)
        self._integral = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def fraction(self, x0: int, y0: int, width: int, height: int) -> float:
        """Fraction of tissue pixels under the level-0 box (thumbnail pixels rounded to the nearest)."""
        mh, mw = self.mask.shape
        x1 = min(mw, max(int(round(x0 / self.scale)) + 1, int(round((x0 + width) / self.scale))))
        y1 = min(mh, max(int(round(y0 / self.scale)) + 1, int(round((y0 + height) / self.scale))))
        x0, y0 = min(mw, int(round(x0 / self.scale))), min(mh, int(round(y0 / self.scale)))
        area = (x1 - x0) * (y1 - y0)
        if area <= 0:
            return 0.0
        s = self._integral
        return float(s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]) / area

    def fractions(self, xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> np.ndarray:
        """:meth:`fraction` for every box with a corner at ``(xs[j], ys[i])``: ``[len(ys), len(xs)]``."""
        mh, mw = self.mask.shape

        def bounds(starts: np.ndarray, side: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
            lo = np.rint(starts / self.scale).astype(np.int64)
            hi = np.minimum(limit, np.maximum(lo + 1, np.rint((starts + side) / self.scale).astype(np.int64)))
            return np.minimum(limit, lo), hi

        x0, x1 = bounds(np.asarray(xs, np.float64), width, mw)
        y0, y1 = bounds(np.asarray(ys, np.float64), height, mh)
        s = self._integral
        total = s[np.ix_(y1, x1)] - s[np.ix_(y0, x1)] - s[np.ix_(y1, x0)] + s[np.ix_(y0, x0)]
        area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
        return np.where(area > 0, total / np.maximum(area, 1), 0.0)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0..255, float32."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(-1), rgb.min(-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1) * 255.0, 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu (1979): the threshold on 0..255 values that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0, 256))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def thumbnail(slide: Slide, max_side: int) -> tuple[np.ndarray, int]:
    """``[mh, mw, 3]`` uint8 box-filtered thumbnail with an integer ``scale`` (level-0 px per pixel)."""
    width, height = slide.dimensions
    scale = max(1, math.ceil(max(width, height) / max_side))
    mw, mh = math.ceil(width / scale), math.ceil(height / scale)
    levels = slide.level_downsamples
    level = max((i for i, ds in enumerate(levels) if ds <= scale + 1e-6), key=lambda i: levels[i], default=0)
    ds = levels[level]
    step = max(1, int(_CHUNK_READ_PX * ds // scale))  # thumbnail pixels per chunk side
    out = np.empty((mh, mw, 3), np.uint8)
    for ty in range(0, mh, step):
        for tx in range(0, mw, step):
            cw, ch = min(step, mw - tx), min(step, mh - ty)
            rw, rh = max(1, round(cw * scale / ds)), max(1, round(ch * scale / ds))
            region = slide.read(tx * scale, ty * scale, level, rw, rh)
            out[ty:ty + ch, tx:tx + cw] = _reduce(region, cw, ch)
    return out, scale


def _reduce(region: np.ndarray, width: int, height: int) -> np.ndarray:
    """Box-filter ``region`` to ``width`` x ``height``: an exact block mean for integer factors (so the
    thumbnail of a rotated slide is the rotated thumbnail), Pillow's box filter otherwise."""
    rh, rw = region.shape[:2]
    if (rw, rh) == (width, height):
        return region
    if rw % width == 0 and rh % height == 0 and rw // width == rh // height:
        f = rw // width
        sums = region.reshape(height, f, width, f, 3).sum(axis=(1, 3), dtype=np.uint32)  # h, w, 3; no float copy
        return ((sums + f * f // 2) // (f * f)).astype(np.uint8)
    return np.asarray(Image.fromarray(region).resize((width, height), Image.Resampling.BOX))


def detect_tissue(slide: Slide, method: str = "otsu", max_side: int = 1024, min_saturation: float = 15.0) -> TissueMask:
    """Tissue mask of ``slide``: ``method`` "otsu" (saturation above Otsu's threshold and above
    ``min_saturation``) or "none" (everything counts as tissue)."""
    thumb, scale = thumbnail(slide, max_side)
    if method == "none":
        return TissueMask(np.ones(thumb.shape[:2], bool), thumb, scale, float("nan"), method)
    if method != "otsu":
        raise ValueError(f"tissue method must be 'otsu' or 'none', got {method!r}")
    sat = saturation(thumb)
    threshold = max(otsu_threshold(sat), float(min_saturation))
    return TissueMask(sat > threshold, thumb, scale, threshold, method)
