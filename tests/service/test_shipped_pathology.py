"""The committed pathology model on real tissue, through every path a user takes: a patch set through
the jobs API gives what ``training.cli evaluate`` gives on the same patches (two code paths, PyTorch
and ONNX Runtime), and the real slide scored by the CLI and by a job gives the same tiles at the
model's resolution, with a QuPath GeoJSON and a heatmap. Neither request names the model: both
scorers default to the best pathology model in ``models/``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from data_paths import SLIDE, require
from test_score_jobs import submit_path, wait_job
from test_score_slides import check_qupath_geojson, read_tiles

from service.repository import ModelRepository, best_pathology_model
from service.score import main as score_main
from service.score import newest_valid
from training.cli import main as train_cli

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SAMPLE = ROOT / "tests" / "data" / "pcam-valid-sample"


def _best() -> tuple[str, Path]:
    """The best pathology model in models/ and its default (newest) version folder."""
    newest = newest_valid(ModelRepository(MODELS).scan())
    name = best_pathology_model(e.card for e in newest.values())
    assert name is not None, "no pathology model is committed in models/"
    return name, newest[name].path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root / "pcam-sample", ignore=shutil.ignore_patterns("*.md"))
    return root


def test_patch_job_gives_what_training_evaluate_gives(jobs_client, data_dir, tmp_path):
    name, version = _best()
    report = tmp_path / "evaluate.json"
    assert train_cli(["evaluate", "--checkpoint", str(version / "checkpoint_best.pt"), "--data", str(SAMPLE),
                      "--split", "all", "--angle-step", "0", "--no-progress", "--output", str(report)]) == 0
    expected = json.loads(report.read_text())

    client = jobs_client(model_dir=MODELS)
    r = client.post("/v1/jobs/patches", json={"path": "pcam-sample", "options": {"batch_size": 8}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout_s=300)
    assert job["state"] == "succeeded" and job["model"] == name, job
    summary = client.get(job["links"]["results"]["summary.json"]).json()
    assert summary["count"] == expected["count"] == 32
    assert summary["accuracy"] == expected["accuracy"]
    assert summary["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-9)
    matrix = summary["confusion_matrix"]["matrix"]
    per_class = {label: matrix[i][i] / sum(matrix[i]) for i, label in enumerate(summary["confusion_matrix"]["labels"])}
    assert per_class == pytest.approx(expected["per_class_accuracy"])
    assert summary["accuracy"] > 0.6  # a trained model, not chance (what it scored on valid is in its card)


def test_real_slide_by_cli_and_by_job(jobs_client, data_dir, tmp_path):
    name, version = _best()
    card = json.loads((version / "card.json").read_text())
    slide = require(SLIDE)
    shutil.copy(slide, data_dir / "real.svs")
    out = tmp_path / "cli"
    assert score_main(["slide", str(slide), "--out", str(out), "--model-dir", str(MODELS), "--threads", "2",
                       "--batch-size", "16", "--quiet"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"]["name"] == name and meta["model"]["mpp"] == card["mpp"]
    plan = meta["plan"]
    side = card["input"]["height"] * card["mpp"] / plan["slide_mpp"]  # level-0 pixels a tile covers
    assert abs(plan["tile_level0_px"] - side) <= 1
    tiles = read_tiles(out / "tiles.csv")
    assert meta["counts"]["scored_tiles"] == len(tiles) > 20 and meta["counts"]["skipped_tiles"] > 0
    check_qupath_geojson(out / "tiles.geojson", tiles, tuple(card["labels"]))
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {t["predicted"] for t in tiles} <= set(card["labels"])

    client = jobs_client(model_dir=MODELS)
    r = submit_path(client, "real.svs", model=None, batch_size=16)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout_s=300)
    assert job["state"] == "succeeded" and job["model"] == name, job
    served = list(csv.DictReader(io.StringIO(client.get(job["links"]["results"]["tiles.csv"]).text)))
    assert served == tiles
