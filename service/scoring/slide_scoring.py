"""Whole-slide scoring: tissue mask, tile grid at the model's resolution, streamed tiles, and the
result files (``tiles.csv``, ``tiles.geojson``, ``heatmap.npy``, ``heatmap.png``, ``metadata.json``)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from service import __version__
from gsa_contract import ModelCard
from service.scoring.checkpoint import Checkpoint, digest
from service.scoring.scoring_errors import BadParameter, NoTissue
from service.scoring.outputs import (EMBEDDING_MODES, EMBEDDINGS_FILE, GeoJSONWriter, atomic_open, csv_writer, heatmap_png,
                                     write_embeddings, write_json, write_npy)
from service.scoring.pipeline import Scores, ScoringModel, score_items
from service.scoring.slide_reader import DEFAULT_MAX_PLAIN_PIXELS, Slide, open_slide
from service.scoring.tiling import TilePlan, plan_tiles
from service.scoring.tissue import TissueMask, detect_tissue

__all__ = ["SlideOptions", "SLIDE_RESULTS", "score_slide", "model_info", "check_model"]

log = logging.getLogger(__name__)

_BLOCK_READ_PX = 1024  # tiles are read in square blocks of about this many level pixels
SLIDE_RESULTS = ("tiles.csv", "tiles.geojson", "heatmap.npy", "heatmap.png", "metadata.json")
Progress = Callable[[int, int], None]


_MAX = {"batch_size": 1024, "readers": 16, "prefetch": 64, "mask_size": 8192}  # bounds memory and threads


@dataclass
class SlideOptions:
    """How to tile and score a slide (every field has a default; jobs and the CLI set them by name)."""

    stride: int | None = None  # model pixels between tile origins; default: the tile size (no overlap)
    overlap: float | None = None  # alternative to stride: fraction of a tile shared with the next one
    min_tissue: float = 0.5  # fraction of a tile's area that must be tissue for it to be scored
    tissue: str = "otsu"  # "otsu" (saturation) or "none" (score every tile)
    mask_size: int = 1024  # longest side of the thumbnail the mask is computed on
    min_saturation: float = 15.0  # floor on the Otsu threshold (0..255): blank slides find no tissue
    slide_mpp: float | None = None  # override (or supply) the slide's micrometres per pixel
    tolerance: float = 0.02  # relative scale difference below which a level is read without resampling
    batch_size: int = 32
    readers: int = 1  # reader threads
    prefetch: int = 4  # batches read ahead of the model
    heatmap_label: str | None = None  # label drawn in heatmap.png; default: the last one
    embeddings: str = "none"  # "invariant": embeddings.h5 with per-tile [D] features; "full": also [D, |H|]
    max_plain_pixels: int = DEFAULT_MAX_PLAIN_PIXELS

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlideOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadParameter(f"unknown slide options {unknown} (known: {sorted(known)})")
        return cls(**data).checked()

    def checked(self) -> "SlideOptions":
        if self.stride is not None and self.overlap is not None:
            raise BadParameter("give stride or overlap, not both")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise BadParameter(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0 <= self.min_tissue <= 1:
            raise BadParameter(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.tissue not in ("otsu", "none"):
            raise BadParameter(f"tissue must be 'otsu' or 'none', got {self.tissue!r}")
        if self.embeddings not in EMBEDDING_MODES:
            raise BadParameter(f"embeddings must be one of {list(EMBEDDING_MODES)}, got {self.embeddings!r}")
        for name in ("batch_size", "readers", "prefetch", "mask_size"):
            if not 1 <= getattr(self, name) <= _MAX[name]:
                raise BadParameter(f"{name} must be in 1..{_MAX[name]}, got {getattr(self, name)}")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise BadParameter(f"slide_mpp must be positive, got {self.slide_mpp}")
        return self

    def stride_for(self, tile: int) -> int:
        if self.overlap is not None:
            return max(1, int(round(tile * (1 - self.overlap))))
        return self.stride or tile


def model_info(model: ScoringModel) -> dict[str, Any]:
    card = model.card
    return {"name": card.name, "version": card.version, "sha256": card.sha256, "mpp": card.mpp,
            "labels": list(card.labels), "input": [card.height, card.width, card.channels],
            "group": {"name": card.group_name, "elements": [e.as_dict() for e in card.elements]}}


def _select_tiles(plan: TilePlan, mask: TissueMask, min_tissue: float) -> tuple[np.ndarray, np.ndarray]:
    """(col, row) int32 ``[n, 2]`` of the tiles to score and their tissue fractions, in blocks of
    about ``_BLOCK_READ_PX`` level pixels a side (row-major within and across blocks), so that
    OpenSlide's tile cache serves neighbouring tiles however wide the slide."""
    step = plan.stride * plan.downsample
    xs = np.rint(np.arange(plan.cols) * step)  # as TilePlan.origin
    ys = np.rint(np.arange(plan.rows) * step)
    side = plan.tile_level0
    if mask.method == "none":
        fracs = np.ones((plan.rows, plan.cols))
    else:
        fracs = mask.fractions(xs, ys, side, side)
    rows, cols = np.nonzero((fracs >= min_tissue) & (fracs > 0))
    block = max(1, int(_BLOCK_READ_PX // (step / plan.level_downsample)))
    order = np.lexsort((cols, rows, cols // block, rows // block))
    grid = np.stack([cols[order], rows[order]], 1).astype(np.int32)
    return grid, fracs[rows[order], cols[order]].astype(np.float32)


def _tile_loader(slide: Slide, plan: TilePlan, grid: np.ndarray, channels: int) -> Callable[[range], np.ndarray]:
    def load(idx: range) -> np.ndarray:
        batch = np.empty((len(idx), plan.tile, plan.tile, channels), np.uint8)
        for j, i in enumerate(idx):
            x, y = plan.origin(*grid[i])
            region = slide.read(x, y, plan.level, plan.read_size, plan.read_size)
            if plan.resample:
                region = np.asarray(Image.fromarray(region).resize((plan.tile, plan.tile), Image.Resampling.BILINEAR))
            batch[j] = region
        return batch

    return load


def check_model(card: ModelCard, options: SlideOptions) -> None:
    """A slide needs a square RGB model (and a heatmap label it knows)."""
    if card.channels != 3:
        raise BadParameter(f"model '{card.name}' takes {card.channels}-channel images; slides need an RGB model")
    if card.height != card.width:
        raise BadParameter(f"model '{card.name}' takes {card.width}x{card.height} inputs; tiles are square")
    if options.heatmap_label is not None and options.heatmap_label not in card.labels:
        raise BadParameter(f"heatmap_label {options.heatmap_label!r} is not one of the model's labels {list(card.labels)}")


def _plan_and_mask(slide: Slide, card: ModelCard, options: SlideOptions) -> tuple[TilePlan, TissueMask, np.ndarray, np.ndarray]:
    """The grid, the tissue mask, and the tiles to score with their tissue fractions."""
    plan = plan_tiles(slide.dimensions, slide.level_downsamples, options.slide_mpp or slide.mpp, card.mpp,
                      card.width, options.stride_for(card.width), options.tolerance)
    if plan.count == 0:
        raise BadParameter(f"slide {slide.path.name} ({slide.dimensions[0]}x{slide.dimensions[1]} px) is smaller "
                           f"than one {plan.tile_level0}-pixel tile at the model's resolution")
    mask = detect_tissue(slide, options.tissue, options.mask_size, options.min_saturation)
    grid, fracs = _select_tiles(plan, mask, options.min_tissue)
    if len(grid) == 0:
        raise NoTissue(
            f"no tile of {slide.path.name} has at least {options.min_tissue:.0%} tissue (saturation threshold "
            f"{mask.threshold:.1f}, {mask.tissue_fraction:.1%} of the thumbnail is tissue); lower min_tissue "
            "or pass tissue='none'"
        )
    return plan, mask, grid, fracs


def _score_tiles(
    model: ScoringModel, slide: Slide, plan: TilePlan, grid: np.ndarray, options: SlideOptions,
    progress: Progress | None, cancel: threading.Event | None, checkpoint: Checkpoint | None = None,
) -> Scores:
    """Probabilities ``[n, K]``, dominant group element ``[n]`` (and features) of every tile in ``grid``."""
    fingerprint = {"kind": "slide", "model": model.card.sha256, "grid": digest(grid), "plan": plan.as_dict()}
    return score_items(
        model, len(grid), _tile_loader(slide, plan, grid, model.card.channels), batch_size=options.batch_size,
        readers=options.readers, prefetch=options.prefetch, cancel=cancel, progress=progress,
        features=options.embeddings != "none", checkpoint=checkpoint, fingerprint=fingerprint,
    )


def score_slide(
    model: ScoringModel,
    path: str | Path,
    out_dir: str | Path,
    options: SlideOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    checkpoint: Checkpoint | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Score every tissue tile of the slide at ``path``; write the result files to ``out_dir`` and
    return the run metadata (also written as ``metadata.json``). With a ``checkpoint`` the scored
    tiles are saved as it goes and a run resumes from what it holds; ``source_name`` is how the
    metadata names the slide (default: its file name; never the server's absolute path).

    Raises:
        ScoringError subclasses: unreadable or unsupported slide, no resolution, no tissue, cancelled.
    """
    options = (options or SlideOptions()).checked()
    card = model.card
    check_model(card, options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with open_slide(path, options.max_plain_pixels) as slide:
        plan, mask, grid, fracs = _plan_and_mask(slide, card, options)
        t_mask = time.perf_counter() - t_start
        probs, orient, stats, feats = _score_tiles(model, slide, plan, grid, options, progress, cancel, checkpoint)
        slide_info = {
            "path": source_name or slide.path.name, "name": slide.path.name, "format": slide.format,
            "dimensions": list(slide.dimensions), "level_dimensions": [list(d) for d in slide.level_dimensions],
            "level_downsamples": list(slide.level_downsamples), "mpp": slide.mpp,
        }
    t_write = time.perf_counter()
    _write_slide_results(out_dir, card, plan, mask, grid, fracs, probs, orient, options)
    results = list(SLIDE_RESULTS)
    if feats is not None:
        coords = np.array([plan.origin(int(col), int(row)) for col, row in grid], np.int64).reshape(-1, 2)
        write_embeddings(out_dir / EMBEDDINGS_FILE, feats, {"coords": coords, "grid": grid.astype(np.int64)},
                         options.embeddings, {**embedding_attrs(card), "tile_size_level0": plan.tile_level0,
                                              "slide": slide_info["name"]})
        results.insert(-1, EMBEDDINGS_FILE)
    n = len(grid)
    meta = {
        "kind": "slide", "service_version": __version__, "model": model_info(model), "slide": slide_info,
        "options": asdict(options), "plan": plan.as_dict(),
        "tissue": {"method": mask.method, "threshold": None if mask.method == "none" else mask.threshold,
                   "thumbnail_scale": mask.scale, "tissue_fraction": mask.tissue_fraction},
        "counts": {"grid_tiles": plan.count, "tissue_tiles": n, "scored_tiles": n,
                   "skipped_tiles": plan.count - n},
        "timing": {"resumed_from": checkpoint.resumed_from if checkpoint is not None else 0,
                   "total_s": round(time.perf_counter() - t_start, 3), "tissue_s": round(t_mask, 3),
                   "scoring": stats.as_dict(), "writing_s": round(time.perf_counter() - t_write, 3)},
        "results": results,
    }
    write_json(out_dir / "metadata.json", meta)
    return meta


def embedding_attrs(card: ModelCard) -> dict[str, object]:
    return {"model": card.name, "model_version": card.version, "mpp": card.mpp if card.mpp is not None else "",
            "group": card.group_name, "group_elements": [e.as_dict() for e in card.elements],
            "features": "orientation-pooled mean of the model's features output (invariant)"}


def _write_slide_results(
    out_dir: Path, card: ModelCard, plan: TilePlan, mask: TissueMask, grid: np.ndarray, fracs: np.ndarray,
    probs: np.ndarray, orient: np.ndarray, options: SlideOptions,
) -> None:
    labels = card.labels
    side = plan.tile_level0
    angles = [e.angle for e in card.elements]
    with (atomic_open(out_dir / "tiles.csv", newline="") as f,
          GeoJSONWriter(out_dir / "tiles.geojson", labels, card.sha256) as geo):
        w = csv_writer(f)
        w.writerow(["col", "row", "minx", "miny", "width", "height", "tissue_fraction",
                    *(f"prob_{name}" for name in labels), "predicted", "dominant_orientation_deg"])
        for i, (col, row) in enumerate(grid):
            x, y = plan.origin(col, row)
            p = probs[i]
            w.writerow([col, row, x, y, side, side, f"{fracs[i]:.4f}", *(f"{v:.6f}" for v in p),
                        labels[int(p.argmax())], angles[orient[i]]])
            geo.add(x, y, side, side, p, {"tissue_fraction": round(float(fracs[i]), 4),
                                         "dominant_orientation_deg": angles[orient[i]]})
    heat = np.full((plan.rows, plan.cols, len(labels)), np.nan, np.float32)
    heat[grid[:, 1], grid[:, 0]] = probs
    write_npy(out_dir / "heatmap.npy", heat)
    label = options.heatmap_label or labels[-1]
    cell = plan.stride * plan.downsample / mask.scale
    extent = (int(round(plan.cols * cell)), int(round(plan.rows * cell)))
    heatmap_png(out_dir / "heatmap.png", mask.thumbnail, heat[:, :, labels.index(label)], extent)
