"""Patch-set scoring through the CLI: real PCam patches (``pcam-subset`` under ``$GSA_TEST_DATA``) as an
ImageFolder tree, as a PCam-layout HDF5 pair and as .npy/.npz arrays give the same rows; the
summary (accuracy, ROC AUC, confusion matrix) matches a direct computation.

The model has random (seeded) weights: the figures check the arithmetic, not the model.
"""

from __future__ import annotations

import csv
import json
import shutil
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from data_paths import PCAM, require
from PIL import Image
from scoring_fixtures import PATH_MODEL

from service.score import main as score_main

PER_CLASS = 40


@pytest.fixture(scope="module")
def pcam(tmp_path_factory) -> dict:
    """40 real PCam patches of each class: an ImageFolder copy, the arrays, and the HDF5 pair."""
    pcam = require(PCAM) / "valid"
    import h5py

    root = tmp_path_factory.mktemp("pcam")
    folder = root / "folder"
    images, labels = [], []
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        for src in sorted((pcam / label).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(src, folder / label / src.name)
            with Image.open(src) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(int(label))
    x, y = np.stack(images), np.array(labels, np.uint8)
    with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(root / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=y.reshape(-1, 1, 1, 1))
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    np.savez(root / "set.npz", x=x, y=y)
    return {"root": root, "folder": folder, "x": x, "y": y}


def run_cli(repo: Path, out: Path, *args: str) -> int:
    return score_main(["patches", *args, "--model", PATH_MODEL, "--model-dir", str(repo), "--out", str(out),
                       "--threads", "1", "--quiet", "--batch-size", "16"])


def rows(out: Path) -> list[dict]:
    with (out / "patches.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_patch_sources_agree_and_summary_is_right(path_model_repo, path_model, pcam, tmp_path):
    root = pcam["root"]
    sources = {
        "folder": (str(pcam["folder"]),),
        "hdf5": (str(root / "camelyonpatch_level_2_split_valid_x.h5"),),
        "npy": (str(root / "x.npy"), "--labels", str(root / "y.npy")),
        "npz": (str(root / "set.npz"),),
    }
    results = {}
    for name, args in sources.items():
        assert run_cli(path_model_repo, tmp_path / name, *args, "--fit", "crop") == 0, name
        results[name] = rows(tmp_path / name)
    n = 2 * PER_CLASS
    for name, got in results.items():
        assert len(got) == n, name
        for a, b in zip(got, results["hdf5"]):
            assert (a["label"], a["prob_tumor"], a["predicted"]) == (b["label"], b["prob_tumor"], b["predicted"]), name
    assert results["folder"][0]["id"].startswith("0/") and results["hdf5"][0]["id"] == "0"

    # the rows are the model's outputs on the centre 16x16 crops
    crops = pcam["x"][:, 40:56, 40:56]
    probs = path_model.run(np.ascontiguousarray(crops))["probabilities"]
    got = np.array([[float(r["prob_normal"]), float(r["prob_tumor"])] for r in results["npz"]])
    np.testing.assert_allclose(got, probs, atol=2e-6)

    summary = json.loads((tmp_path / "npz" / "summary.json").read_text())
    truth, predicted = pcam["y"].astype(int), probs.argmax(1)
    assert summary["count"] == n and summary["accuracy"] == pytest.approx((predicted == truth).mean())
    pos, neg = probs[truth == 1, 1], probs[truth == 0, 1]
    pairwise = np.mean([(p > q) + 0.5 * (p == q) for p, q in product(pos, neg)])
    assert summary["roc_auc"] == pytest.approx(pairwise)
    matrix = [[int(((truth == t) & (predicted == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    assert summary["confusion_matrix"]["matrix"] == matrix and sum(map(sum, matrix)) == n


def test_flat_folder_without_labels_and_orientation(path_model_repo, pcam, tmp_path):
    """A flat folder has no labels (no summary); rotating every patch by 90 degrees keeps its
    probabilities and turns its dominant orientation by a quarter turn (R4 model)."""
    flat = tmp_path / "flat"
    flat.mkdir()
    crops = pcam["x"][:12, 40:56, 40:56]
    for i, patch in enumerate(crops):
        Image.fromarray(patch).save(flat / f"p{i:02d}.png")
    np.save(tmp_path / "rot.npy", np.ascontiguousarray(np.rot90(crops, 1, axes=(1, 2))))
    assert run_cli(path_model_repo, tmp_path / "a", str(flat)) == 0
    assert run_cli(path_model_repo, tmp_path / "b", str(tmp_path / "rot.npy")) == 0
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert "label" not in a[0] and not (tmp_path / "a" / "summary.json").exists()
    assert [r["id"] for r in a] == [f"p{i:02d}.png" for i in range(12)]
    np.testing.assert_allclose([float(r["prob_tumor"]) for r in b], [float(r["prob_tumor"]) for r in a], atol=1e-5)
    turns = {(float(rb["dominant_orientation_deg"]) - float(ra["dominant_orientation_deg"])) % 360 for ra, rb in zip(a, b)}
    assert len(turns) == 1 and turns <= {90.0, 270.0}


def test_patch_set_errors(path_model_repo, pcam, tmp_path, capsys):
    assert run_cli(path_model_repo, tmp_path / "o", str(pcam["folder"])) == 2  # 96x96 patches, 16x16 model
    assert "pass fit='resize' or fit='crop'" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 16, 16, 3), np.float32))
    assert run_cli(path_model_repo, tmp_path / "o", str(bad)) == 2
    assert "expected uint8 pixels" in capsys.readouterr().err
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert run_cli(path_model_repo, tmp_path / "o", str(tmp_path / "junk.h5")) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err
    assert run_cli(path_model_repo, tmp_path / "o", str(tmp_path / "x.csv")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_embeddings_file_is_keyed_and_invariant(path_model_repo, pcam, tmp_path):
    """``--embeddings full``: embeddings.h5 holds per-patch invariant features [n, D] (the mean of
    [n, D, |H|] over the group axis) keyed by patch id; a quarter-turned copy of the set gets the
    same invariant features and per-element features rolled along the group axis."""
    import h5py

    x = pcam["x"][:8]
    turned = np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
    np.save(tmp_path / "up.npy", x)
    np.save(tmp_path / "turned.npy", turned)
    feats = {}
    for name in ("up", "turned"):
        out = tmp_path / f"out_{name}"
        assert run_cli(path_model_repo, out, str(tmp_path / f"{name}.npy"), "--embeddings", "full", "--fit", "crop") == 0
        with h5py.File(out / "embeddings.h5") as f:
            feats[name] = (f["features"][:], f["features_per_element"][:], [i.decode() for i in f["ids"][:]])
            assert f.attrs["model"] == PATH_MODEL and f.attrs["group"] == "R4"
        assert "embeddings.h5" in json.loads((out / "metadata.json").read_text())["results"]
    inv, per, ids = feats["up"]
    assert inv.shape == (8, per.shape[1]) and per.shape[2] == 4 and ids == [r["id"] for r in rows(tmp_path / "out_up")]
    np.testing.assert_allclose(inv, per.mean(axis=2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(feats["turned"][0], inv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats["turned"][1], np.roll(per, 1, axis=2), rtol=1e-4, atol=1e-5)
    assert not np.allclose(per, np.roll(per, 1, axis=2), atol=1e-4)


def test_embeddings_need_a_model_with_features(path_model_repo, pcam, tmp_path, capsys):
    """A card without a features output: asking for embeddings fails with a message that says so."""
    repo = tmp_path / "repo"
    shutil.copytree(path_model_repo / PATH_MODEL, repo / PATH_MODEL)
    card_path = repo / PATH_MODEL / "1" / "card.json"
    card = json.loads(card_path.read_text())
    del card["outputs"]["features"]
    card_path.write_text(json.dumps(card))
    np.save(tmp_path / "x.npy", pcam["x"][:2])
    assert run_cli(repo, tmp_path / "o", str(tmp_path / "x.npy"), "--embeddings", "invariant", "--fit", "crop") == 2
    assert "exported without features" in capsys.readouterr().err
    assert run_cli(repo, tmp_path / "o2", str(tmp_path / "x.npy"), "--fit", "crop") == 0
