"""The tile grid at the model's resolution, and which pyramid level to read it from.

Tiles are laid out in model pixels (``tile`` a side, ``stride`` apart, from the slide's top-left
corner) and mapped to level-0 pixels by ``d = model_mpp / slide_mpp``. A grid whose extent leaves
no remainder (``(W - tile) % stride == 0``) maps onto itself under 90-degree rotations of the slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.scoring.scoring_errors import BadParameter, NoResolution

__all__ = ["TilePlan", "plan_tiles"]


@dataclass(frozen=True)
class TilePlan:
    """Where each tile lies and how to read it.

    ``downsample`` is level-0 pixels per model pixel; ``level`` the pyramid level read, with
    ``read_size`` pixels a side there, resampled to ``tile`` when ``resample``.
    """

    tile: int
    stride: int
    cols: int
    rows: int
    downsample: float
    level: int
    level_downsample: float
    read_size: int
    resample: bool
    slide_mpp: float
    model_mpp: float

    @property
    def count(self) -> int:
        return self.cols * self.rows

    @property
    def tile_level0(self) -> int:
        """Tile side in level-0 pixels."""
        return int(round(self.tile * self.downsample))

    def origin(self, col: int, row: int) -> tuple[int, int]:
        """Level-0 top-left corner of tile ``(col, row)``."""
        step = self.stride * self.downsample
        return int(round(col * step)), int(round(row * step))

    def as_dict(self) -> dict:
        return {
            "tile_px": self.tile, "stride_px": self.stride, "grid_cols": self.cols, "grid_rows": self.rows,
            "level0_px_per_model_px": self.downsample, "tile_level0_px": self.tile_level0, "level": self.level,
            "level_downsample": self.level_downsample, "read_size_px": self.read_size, "resampled": self.resample,
            "slide_mpp": self.slide_mpp, "model_mpp": self.model_mpp,
        }


def plan_tiles(
    dimensions: tuple[int, int],
    level_downsamples: tuple[float, ...],
    slide_mpp: float | None,
    model_mpp: float | None,
    tile: int,
    stride: int | None = None,
    tolerance: float = 0.02,
) -> TilePlan:
    """The grid for a slide of level-0 ``dimensions``.

    The level read is the coarsest one still at least as fine as the model's resolution (within
    ``tolerance``), so that tiles are only ever shrunk; when its scale differs from the model's by
    more than ``tolerance``, each tile is read larger and resampled.

    Raises:
        NoResolution: the card or the slide has no mpp.
        BadParameter: a non-positive stride.
    """
    if model_mpp is None:
        raise NoResolution("the model card has no resolution ('mpp', micrometres per pixel), so slides cannot be "
                           "tiled at its scale; export the model with --mpp")
    if slide_mpp is None:
        raise NoResolution("the slide does not record its resolution (micrometres per pixel); pass slide_mpp")
    stride = tile if stride is None else stride
    if stride < 1:
        raise BadParameter(f"stride must be at least 1 pixel, got {stride}")
    d = model_mpp / slide_mpp
    usable = [i for i, ds in enumerate(level_downsamples) if ds <= d * (1 + tolerance)]
    level = max(usable, key=lambda i: level_downsamples[i]) if usable else 0
    ds = level_downsamples[level]
    ratio = d / ds  # level pixels per model pixel
    resample = abs(ratio - 1) > tolerance
    read_size = int(math.ceil(tile * ratio - 1e-6)) if resample else tile
    width, height = dimensions
    span_w, span_h = int(math.floor(width / d + 1e-6)), int(math.floor(height / d + 1e-6))
    cols = (span_w - tile) // stride + 1 if span_w >= tile else 0
    rows = (span_h - tile) // stride + 1 if span_h >= tile else 0
    return TilePlan(tile, stride, cols, rows, d, level, ds, read_size, resample, slide_mpp, model_mpp)
