"""Result files: tile and patch CSVs, a QuPath GeoJSON FeatureCollection, the heatmap (``.npy``
and a PNG over the slide thumbnail), run metadata as JSON. Written to a temporary name and renamed,
so that a reader never sees half a file."""

from __future__ import annotations

import csv
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from PIL import Image

__all__ = ["atomic_open", "write_json", "write_npy", "write_embeddings", "EMBEDDINGS_FILE", "EMBEDDING_MODES",
           "GeoJSONWriter", "heatmap_png", "label_colour"]

# QuPath's default-like class colours (RGB), by label index
_COLOURS = [(64, 160, 64), (200, 0, 0), (0, 90, 200), (230, 160, 0), (150, 0, 150), (0, 160, 160)]


def label_colour(index: int) -> list[int]:
    return list(_COLOURS[index % len(_COLOURS)])


@contextmanager
def atomic_open(path: Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, newline=newline, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: dict) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array)


EMBEDDINGS_FILE = "embeddings.h5"
EMBEDDING_MODES = ("none", "invariant", "full")


def write_embeddings(path: Path, features: np.ndarray, keys: dict[str, np.ndarray], mode: str,
                     attrs: dict[str, object]) -> None:
    """Per-item embeddings as HDF5, the layout slide-level (multiple-instance) pipelines read:
    ``features`` ``[n, D]`` (the orientation-pooled, invariant mean over the group axis), with
    ``mode`` "full" also ``features_per_element`` ``[n, D, G]``, and one dataset per key (tile
    ``coords`` ``[n, 2]`` at level 0, patch ``ids``); ``attrs`` on the file (model, group, mpp)."""
    import h5py

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.mean(axis=2), compression="gzip", compression_opts=4)
            if mode == "full":
                f.create_dataset("features_per_element", data=features, compression="gzip", compression_opts=4)
            for name, values in keys.items():
                f.create_dataset(name, data=values)
            for name, value in attrs.items():
                f.attrs[name] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class GeoJSONWriter:
    """A FeatureCollection of tile polygons, streamed one feature at a time, in the form QuPath
    (0.4+) imports: ``objectType`` "tile", ``classification`` {name, color}, ``measurements``.
    Feature ids are name-based UUIDs of ``salt`` and the tile's box, so that the same run writes the
    same file (a resumed job included)."""

    def __init__(self, path: Path, labels: tuple[str, ...], salt: str = ""):
        self.labels = labels
        self.salt = salt
        self._ctx = atomic_open(path)
        self._f: IO | None = None
        self._first = True

    def __enter__(self) -> "GeoJSONWriter":
        self._f = self._ctx.__enter__()
        self._f.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def add(self, x: int, y: int, w: int, h: int, probabilities: np.ndarray, extra: dict[str, float]) -> None:
        top = int(np.argmax(probabilities))
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        measurements = {f"prob_{name}": round(float(p), 6) for name, p in zip(self.labels, probabilities)}
        measurements.update(extra)
        feature = {
            "type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"gsa-tile:{self.salt}:{x},{y},{w},{h}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile", "isLocked": True,
                "classification": {"name": self.labels[top], "color": label_colour(top)},
                "measurements": measurements,
            },
        }
        assert self._f is not None
        self._f.write(("" if self._first else ",\n") + json.dumps(feature))
        self._first = False

    def __exit__(self, *exc) -> None:
        assert self._f is not None
        if exc[0] is None:
            self._f.write("\n]}\n")
        self._ctx.__exit__(*exc)


def csv_writer(f: IO) -> "csv._writer":
    return csv.writer(f, lineterminator="\n")


def _colormap(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 along blue, cyan, yellow, red (a plain perceptual-enough ramp, no matplotlib)."""
    stops = np.array([[49, 54, 149], [69, 170, 210], [255, 230, 100], [215, 25, 28]], np.float32)
    t = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(t.astype(np.int64), len(stops) - 2)
    frac = (t - i)[..., None]
    return (stops[i] * (1 - frac) + stops[i + 1] * frac).astype(np.uint8)


def heatmap_png(path: Path, thumbnail: np.ndarray, heat: np.ndarray, extent: tuple[int, int], alpha: float = 0.5) -> None:
    """Blend ``heat`` (``[rows, cols]`` in 0..1, NaN where not scored) over ``thumbnail``.

    ``extent`` is the thumbnail-pixel size (width, height) the grid covers, from the top-left corner.
    Done with Pillow images (uint8) so that memory stays a few copies of the thumbnail.
    """
    th, tw = thumbnail.shape[:2]
    ew, eh = max(1, min(tw, extent[0])), max(1, min(th, extent[1]))
    scored = Image.fromarray(np.isfinite(heat).astype(np.uint8) * 255).resize((ew, eh), Image.Resampling.NEAREST)
    levels = np.rint(np.clip(np.nan_to_num(heat, nan=0.0), 0, 1) * 255).astype(np.uint8)  # grid-sized, 1 byte a cell
    colours = Image.fromarray(_colormap(np.linspace(0, 1, 256))[levels]).resize((ew, eh), Image.Resampling.NEAREST)
    base = Image.fromarray(thumbnail)
    blended = Image.blend(base.crop((0, 0, ew, eh)), colours, alpha)
    base.paste(blended, (0, 0), scored)
    with atomic_open(path, "wb") as f:
        base.save(f, format="PNG")
