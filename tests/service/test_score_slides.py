"""Whole-slide scoring end to end, through the CLI and the engine: a pyramidal TIFF written with
tifffile (ground truth known) and the real SVS (``slides/`` under ``$GSA_TEST_DATA``, see
``tests/data_paths.py``).

The model has random (seeded) weights: these tests check plumbing, geometry and equivariance, not
accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from data_paths import SLIDE, require
from scoring_fixtures import MODEL_MPP, PATH_MODEL, pyramid, tissue_image, write_pyramidal_tiff

from service.score import main as score_main
from service.scoring.slide_scoring import SlideOptions, score_slide
from service.scoring.tissue import saturation

ROOT = Path(__file__).resolve().parents[2]


def read_tiles(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_qupath_geojson(path: Path, tiles: list[dict], labels: tuple[str, ...]) -> None:
    """The structure QuPath (0.4+) imports: a FeatureCollection of Features with closed Polygon
    rings, ``objectType``, ``classification`` {name, color} and numeric ``measurements``; one
    feature per CSV row with the same rectangle."""
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == len(tiles)
    for feature, tile in zip(features, tiles):
        assert feature["type"] == "Feature"
        geom = feature["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = geom["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        x, y, w, h = (int(tile[k]) for k in ("minx", "miny", "width", "height"))
        assert ring[:4] == [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] == tile["predicted"] and props["classification"]["name"] in labels
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        measurements = props["measurements"]
        assert all(isinstance(v, (int, float)) for v in measurements.values())
        for name in labels:
            assert measurements[f"prob_{name}"] == pytest.approx(float(tile[f"prob_{name}"]), abs=2e-6)


def probs_of(tiles: list[dict], labels: tuple[str, ...]) -> np.ndarray:
    return np.array([[float(t[f"prob_{n}"]) for n in labels] for t in tiles], np.float32)


def test_cli_synthetic_slide(path_model_repo, path_model, synthetic_slides, tmp_path):
    """Tiles read from level 1 without resampling; coordinates, probabilities, tissue, GeoJSON,
    heatmap and metadata all agree with the ground truth image."""
    out = tmp_path / "out"
    rc = score_main(["slide", str(synthetic_slides["slide"]), "--model", PATH_MODEL, "--model-dir",
                     str(path_model_repo), "--out", str(out), "--threads", "1", "--quiet", "--batch-size", "8"])
    assert rc == 0
    meta = json.loads((out / "metadata.json").read_text())
    labels = tuple(meta["model"]["labels"])
    plan = meta["plan"]
    assert (plan["level"], plan["resampled"], plan["grid_cols"], plan["grid_rows"]) == (1, False, 32, 24)
    assert plan["tile_level0_px"] == 32 and meta["model"]["mpp"] == MODEL_MPP
    tiles = read_tiles(out / "tiles.csv")
    counts = meta["counts"]
    assert counts["scored_tiles"] == len(tiles) == counts["tissue_tiles"] > 0
    assert counts["grid_tiles"] == 32 * 24 == counts["scored_tiles"] + counts["skipped_tiles"]
    check_qupath_geojson(out / "tiles.geojson", tiles, labels)

    # each tile's probabilities are those of the ground-truth region at its level-0 rectangle
    level1 = pyramid(synthetic_slides["image"], 2)[1]
    regions = np.stack([level1[int(t["miny"]) // 2:int(t["miny"]) // 2 + 16, int(t["minx"]) // 2:int(t["minx"]) // 2 + 16]
                        for t in tiles])
    expected = path_model.run(regions)["probabilities"]
    np.testing.assert_allclose(probs_of(tiles, labels), expected, atol=2e-6)
    assert expected[:, 1].std() > 1e-3  # tiles differ far beyond the tolerance: the comparison can fail

    # tissue: scored tiles hold tissue, tiles that are all tissue are scored, glass is skipped
    truth = saturation(synthetic_slides["image"]) > 60
    scored = {(int(t["minx"]), int(t["miny"])) for t in tiles}
    for row in range(24):
        for col in range(32):
            x, y = col * 32, row * 32
            frac = truth[y:y + 32, x:x + 32].mean()
            if frac >= 0.9:
                assert (x, y) in scored, f"tile at {(x, y)} is {frac:.0%} tissue but was skipped"
            if (x, y) in scored:
                assert frac >= 0.3, f"tile at {(x, y)} is {frac:.0%} tissue but was scored"
    assert max(x for x, _ in scored) < 1024 * 2 // 3  # the empty right third is skipped

    heat = np.load(out / "heatmap.npy")
    assert heat.shape == (24, 32, 2)
    assert np.isfinite(heat[..., 0]).sum() == len(tiles)
    for t, p in zip(tiles, probs_of(tiles, labels)):
        np.testing.assert_allclose(heat[int(t["row"]), int(t["col"])], p, atol=2e-6)
    with Image.open(out / "heatmap.png") as png:
        assert png.size == (1024, 768) and png.mode == "RGB"


def _grid(meta_tiles: list[dict]) -> dict[tuple[int, int], dict]:
    return {(int(t["minx"]), int(t["miny"])): t for t in meta_tiles}


def test_rotated_slide_gives_the_same_tiles(path_model, synthetic_slides, tmp_path):
    """Rotating the slide by 90 degrees maps the tile grid and the tissue mask onto themselves, and
    the R4 model gives each rotated tile the probabilities of the original tile (equivariance end
    to end); the dominant orientation turns by a quarter turn."""
    options = SlideOptions(batch_size=16)
    meta = score_slide(path_model, synthetic_slides["slide"], tmp_path / "a", options)
    meta_r = score_slide(path_model, synthetic_slides["rotated"], tmp_path / "b", options)
    labels = tuple(meta["model"]["labels"])
    a, b = _grid(read_tiles(tmp_path / "a" / "tiles.csv")), _grid(read_tiles(tmp_path / "b" / "tiles.csv"))
    width0, side = meta["slide"]["dimensions"][0], meta["plan"]["tile_level0_px"]
    assert meta_r["slide"]["dimensions"] == meta["slide"]["dimensions"][::-1]
    # np.rot90 (counter-clockwise) sends the tile at (x, y) to (y, W - x - side)
    mapped = {(y, width0 - x - side): t for (x, y), t in a.items()}
    assert set(mapped) == set(b)
    pa = probs_of(list(mapped.values()), labels)
    pb = probs_of([b[k] for k in mapped], labels)
    np.testing.assert_allclose(pb, pa, atol=1e-5)
    assert pa[:, 1].std() > 1e-3
    turns = {(float(b[k]["dominant_orientation_deg"]) - float(t["dominant_orientation_deg"])) % 360
             for k, t in mapped.items()}
    assert len(turns) == 1 and turns <= {90.0, 270.0}


def test_cli_real_svs(path_model_repo, path_model, tmp_path):
    """The real Aperio slide through ``python -m service.score`` in a fresh interpreter (which must
    not import torch): read at the model's 1 um/px from its 0.499 um/px level 0 (resampled)."""
    real_slide = require(SLIDE)
    out = tmp_path / "svs"
    code = (
        "import sys, runpy; sys.argv = ['service.score'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('service.score', run_name='__main__')\n"
        "finally:\n    assert 'torch' not in sys.modules, 'the scoring CLI imported torch'\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "slide", str(real_slide), "--model", PATH_MODEL, "--model-dir",
         str(path_model_repo), "--out", str(out), "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "100.0%" in proc.stderr  # the progress bar ran to the end
    meta = json.loads((out / "metadata.json").read_text())
    labels = tuple(meta["model"]["labels"])
    assert meta["slide"]["format"] == "aperio" and meta["slide"]["mpp"] == pytest.approx(0.499)
    plan = meta["plan"]
    assert plan["resampled"] and plan["level"] == 0 and plan["read_size_px"] == 33
    tiles = read_tiles(out / "tiles.csv")
    assert 0 < len(tiles) < meta["counts"]["grid_tiles"]
    check_qupath_geojson(out / "tiles.geojson", tiles, labels)

    # coordinates: the level-0 rectangle of a tile, read with OpenSlide directly, gives its probabilities
    rng = np.random.default_rng(0)
    picked = [tiles[i] for i in rng.choice(len(tiles), 24, replace=False)]
    with openslide.OpenSlide(str(real_slide)) as slide:
        regions = [np.asarray(slide.read_region((int(t["minx"]), int(t["miny"])), 0, (33, 33)).convert("RGB"))
                   for t in picked]
        thumb = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"))
    batch = np.stack([np.asarray(Image.fromarray(r).resize((16, 16), Image.Resampling.BILINEAR)) for r in regions])
    np.testing.assert_allclose(probs_of(picked, labels), path_model.run(batch)["probabilities"], atol=2e-6)
    # scored tiles are tissue, and blank glass (the slide's mostly white border) is skipped
    threshold = meta["tissue"]["threshold"]
    assert all((saturation(r) > threshold).mean() > 0.2 for r in regions)
    assert meta["tissue"]["tissue_fraction"] < 0.6 and (saturation(thumb) > threshold).mean() < 0.6


def test_cli_bad_input_exit_status(path_model_repo, synthetic_slides, tmp_path, capsys):
    """A card without mpp and a slide without one: exit status 2 and a message saying what to do."""
    base = ["--model-dir", str(path_model_repo), "--out", str(tmp_path / "o"), "--threads", "1", "--quiet"]
    assert score_main(["slide", str(synthetic_slides["slide"]), "--model", "path_nompp", *base]) == 2
    assert "no resolution ('mpp', micrometres per pixel)" in capsys.readouterr().err
    assert score_main(["slide", str(synthetic_slides["nompp"]), "--model", PATH_MODEL, *base]) == 2
    assert "pass slide_mpp" in capsys.readouterr().err
    # the same slide with its resolution given on the command line scores as the tagged one
    assert score_main(["slide", str(synthetic_slides["nompp"]), "--model", PATH_MODEL, "--slide-mpp", "0.5", *base]) == 0
    assert not (tmp_path / "o" / "tiles.csv").read_text() == ""


def test_level0_is_never_read_whole(path_model, tmp_path, monkeypatch):
    """A single-level slide (no pyramid to fall back on): the thumbnail is built from bounded chunks
    and tiles are read one at a time, so no read covers more than a chunk of the slide."""
    import service.scoring.tissue as tissue
    from service.scoring.slide_reader import Slide

    monkeypatch.setattr(tissue, "_CHUNK_READ_PX", 128)
    path = write_pyramidal_tiff(tmp_path / "flat.tiff", tissue_image(768, 1024), mpp=MODEL_MPP, levels=1)
    reads = []
    original = Slide.read

    def spy(self, x0, y0, level, width, height):
        reads.append((level, width, height))
        return original(self, x0, y0, level, width, height)

    monkeypatch.setattr(Slide, "read", spy)
    meta = score_slide(path_model, path, tmp_path / "out", SlideOptions(mask_size=256))
    assert meta["plan"]["level"] == 0 and meta["slide"]["level_dimensions"] == [[1024, 768]]
    assert meta["counts"]["scored_tiles"] > 0
    assert len(reads) > meta["counts"]["scored_tiles"]  # thumbnail chunks and every tile
    assert max(w * h for _, w, h in reads) <= 128 * 128  # 1/48 of the slide


def test_pipeline_reads_ahead_a_bounded_number_of_batches():
    """At most the batch being run plus ``prefetch`` read ahead are held; cancelling stops at the next batch."""
    import threading

    from service.scoring.scoring_errors import Cancelled
    from service.scoring.pipeline import run_pipeline

    class Model:
        card = None

        def run(self, images):
            return {"x": images}

    lock, state = threading.Lock(), {"ahead": 0, "max": 0}

    def load(i):
        with lock:
            state["ahead"] += 1
            state["max"] = max(state["max"], state["ahead"])
        return np.zeros((2, 1), np.uint8)

    def consume(i, out):
        with lock:
            state["ahead"] -= 1

    stats = run_pipeline(Model(), range(50), load, consume, readers=3, prefetch=4)
    assert stats.images == 100 and stats.batches == 50
    assert 1 < state["max"] <= 4 + 1
    cancel = threading.Event()
    seen = []
    with pytest.raises(Cancelled):
        run_pipeline(Model(), range(50), load, lambda i, out: (seen.append(i), i == 9 and cancel.set()),
                     prefetch=2, cancel=cancel)
    assert seen == list(range(10))


def test_plain_png_and_overlap(path_model, synthetic_slides, tmp_path):
    """A plain PNG (one level, resolution given) is tiled like the TIFF: the same tiles, read from
    level 0 and resampled, with close probabilities; overlap 0.5 halves the stride."""
    png = tmp_path / "slide.png"
    Image.fromarray(synthetic_slides["image"]).save(png)
    meta = score_slide(path_model, png, tmp_path / "png", SlideOptions(slide_mpp=0.5))
    ref = score_slide(path_model, synthetic_slides["slide"], tmp_path / "tiff", SlideOptions())
    assert meta["slide"]["format"] == "plain-png" and meta["plan"]["resampled"] and meta["plan"]["read_size_px"] == 32
    a, b = _grid(read_tiles(tmp_path / "png" / "tiles.csv")), _grid(read_tiles(tmp_path / "tiff" / "tiles.csv"))
    assert set(a) == set(b)
    np.testing.assert_allclose(probs_of(list(a.values()), ("tumor",)), probs_of([b[k] for k in a], ("tumor",)), atol=0.02)

    half = score_slide(path_model, synthetic_slides["slide"], tmp_path / "half", SlideOptions(overlap=0.5))
    assert half["plan"]["stride_px"] == 8 and (half["plan"]["grid_cols"], half["plan"]["grid_rows"]) == (63, 47)
    xs = sorted({int(t["minx"]) for t in read_tiles(tmp_path / "half" / "tiles.csv")})
    assert set(np.diff(xs)) == {16} and ref["counts"]["scored_tiles"] < half["counts"]["scored_tiles"]


def _ranked_repo(root: Path, src: Path, accuracies: dict[str, float | None]) -> Path:
    """Copies of the path model under other names, each card with its own validation accuracy
    (None: no mpp, so not a pathology model)."""
    for name, acc in accuracies.items():
        dst = root / name / "1"
        shutil.copytree(src, dst)
        card = json.loads((dst / "card.json").read_text())
        card.update({"name": name, "metrics": {"best": {"val_acc": acc if acc is not None else 0.99}}})
        if acc is None:
            card["mpp"] = None
        (dst / "card.json").write_text(json.dumps(card))
    return root


def test_cli_defaults_to_the_best_pathology_model(path_model_repo, synthetic_slides, tmp_path, capsys):
    """No --model: the RGB model with an mpp whose card reports the highest validation accuracy
    (a model without mpp is passed over whatever its accuracy); none there: exit status 2."""
    src = path_model_repo / PATH_MODEL / "1"
    repo = _ranked_repo(tmp_path / "models", src, {"path_a": 0.80, "path_b": 0.90, "plain": None})
    out = tmp_path / "out"
    args = ["slide", str(synthetic_slides["slide"]), "--out", str(out), "--threads", "1", "--quiet", "--batch-size", "8"]
    assert score_main([*args, "--model-dir", str(repo)]) == 0
    assert json.loads((out / "metadata.json").read_text())["model"]["name"] == "path_b"

    lone = _ranked_repo(tmp_path / "plain_only", src, {"plain": None})
    assert score_main([*args, "--model-dir", str(lone)]) == 2
    assert "name the model with --model" in capsys.readouterr().err
