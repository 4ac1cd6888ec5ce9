"""The model repository: what is served, what is refused and why, and which version is default."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY, _copy_version, make_settings
from service.card import CardError, ModelCard
from service.repository import ModelRepository, ModelState, version_key
from service.errors import ModelNotReady, NotFound


def test_version_order():
    versions = ["10", "2", "1", "1.10.0", "1.2.0", "beta"]
    assert sorted(versions, key=version_key) == ["1", "1.2.0", "1.10.0", "2", "10", "beta"]


def _repo(tmp_path, tiny_model_dir, versions: dict[str, dict]):
    for version, changes in versions.items():
        _copy_version(tiny_model_dir, tmp_path / TINY / version, TINY, version, changes)
    repo = ModelRepository(tmp_path)
    settings = make_settings(tmp_path, warmup=False)
    for mv in repo.scan():
        if repo.load(mv, settings):
            mv.state = ModelState.READY  # what the server does once it serves it
    return repo


def _card(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "card.json").read_text())


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sha256": "f" * 64}, "sha256 of model.onnx"),
        ({"labels": ["a", "b"]}, "card implies [N, 2]"),
        ({"labels": ["a"] * 10}, "duplicates"),
        ({"input": {"height": 20, "width": 20, "channels": 1}}, "card says UINT8 [-1, 20, 20, 1]"),
        ({"group": {"name": "R8", "order": 8, "elements": [{"index": i, "angle": 45.0 * i, "reflection": False} for i in range(8)]}},
         "10, 8]"),  # static ([N, 10, 8]) or, for a dynamic group axis, from the test run ([1, 10, 8])
        ({"group": {"name": "R4", "order": 5, "elements": [{"index": i, "angle": 90.0 * i} for i in range(4)]}}, "order 5"),
        ({"name": "other"}, "card names other/2"),
        ({"mpp": -1}, "'mpp'"),
    ],
)
def test_broken_versions_are_reported_and_the_good_one_is_default(tmp_path, tiny_model_dir, changes, words):
    repo = _repo(tmp_path, tiny_model_dir, {"1": {}, "2": changes})
    broken = repo.find(TINY, "2")
    assert broken.state is ModelState.FAILED and words in broken.reason, broken.reason
    assert broken.model is None
    assert repo.get(TINY).version == "1"  # newest *ready* version
    with pytest.raises(ModelNotReady) as err:
        repo.get(TINY, "2")
    assert words in err.value.message


def test_missing_and_unparsable_files(tmp_path, tiny_model_dir):
    repo_dir = tmp_path / "r"
    _copy_version(tiny_model_dir, repo_dir / TINY / "1", TINY, "1")
    _copy_version(tiny_model_dir, repo_dir / TINY / "2", TINY, "2")
    _copy_version(tiny_model_dir, repo_dir / TINY / "3", TINY, "3")
    (repo_dir / TINY / "2" / "model.onnx").unlink()
    (repo_dir / TINY / "3" / "card.json").write_text("{ nope")
    (repo_dir / ".hidden").mkdir()
    (repo_dir / "README.md").write_text("not a model")
    repo = ModelRepository(repo_dir)
    settings = make_settings(repo_dir, warmup=False)
    for mv in repo.scan():
        repo.load(mv, settings)
    assert list(repo.versions) == [TINY]
    assert "model.onnx is missing" in repo.find(TINY, "2").reason
    assert "not valid JSON" in repo.find(TINY, "3").reason
    assert repo.find(TINY, "1").model is not None


def test_corrupt_graph_with_matching_checksum(tmp_path, tiny_model_dir):
    import hashlib

    folder = _copy_version(tiny_model_dir, tmp_path / TINY / "1", TINY, "1")
    (folder / "model.onnx").write_bytes(b"not onnx")
    card = json.loads((folder / "card.json").read_text())
    card["sha256"] = hashlib.sha256(b"not onnx").hexdigest()
    (folder / "card.json").write_text(json.dumps(card))
    repo = ModelRepository(tmp_path)
    mv = repo.scan()[0]
    assert not repo.load(mv, make_settings(tmp_path))
    assert mv.state is ModelState.FAILED and mv.reason


def test_unknown_names(tmp_path, tiny_model_dir):
    repo = _repo(tmp_path, tiny_model_dir, {"1": {}})
    with pytest.raises(NotFound, match="unknown model 'x'"):
        repo.get("x")
    with pytest.raises(NotFound, match="no version '7'"):
        repo.get(TINY, "7")


@pytest.mark.parametrize("drop", ["name", "labels", "input", "group", "sha256"])
def test_card_requires_fields(tiny_model_dir, drop):
    card = _card(tiny_model_dir)
    del card[drop]
    with pytest.raises(CardError, match=drop):
        ModelCard.from_dict(card)


def test_card_fields(tiny_model_dir):
    card = ModelCard.from_dict(_card(tiny_model_dir))
    assert card.labels == tuple(str(i) for i in range(10))
    assert (card.height, card.width, card.channels) == (16, 16, 1)
    assert [e.angle for e in card.elements] == [0.0, 90.0, 180.0, 270.0]
    assert card.group_name == "R4" and card.mpp is None


def test_server_with_broken_and_empty_repositories(app_client, tmp_path, tiny_model_dir):
    # a broken model leaves the others served; strict readiness makes the server not ready
    c = app_client(strict_readiness=False)
    assert c.get("/v2/health/ready").status_code == 200
    models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert models[TINY]["default_version"] == "2" and models["broken"]["default_version"] is None
    meta = c.get("/v2/models/broken").json()
    assert meta["state"] == "FAILED" and "sha256" in meta["reason"]
    empty = tmp_path / "empty"
    empty.mkdir()
    c2 = app_client(model_dir=empty)
    assert c2.get("/v1/models").json() == {"models": []}
    r = c2.post(f"/v1/models/{TINY}/predict", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 404 and "no models are served" in r.json()["error"]


def test_strict_readiness(model_repo):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(make_settings(model_repo, strict_readiness=True))) as c:
        server = c.app.state.server
        import time

        deadline = time.monotonic() + 30
        while not server.loaded.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.get("/v2/health/ready")
        assert r.status_code == 400 and "failed to load" in r.json()["error"]
        assert c.get(f"/v2/models/{TINY}/ready").status_code == 200


@pytest.mark.parametrize(
    "cuda, overrides, served",
    [
        (True, {}, "model.fp16.onnx"),  # a GPU serves the fp16 graph by default
        (True, {"prefer_fp16": False}, "model.onnx"),
        (True, {"device": "cpu"}, "model.onnx"),  # the CPU never gets the fp16 graph
        (False, {}, "model.onnx"),
    ],
)
def test_graph_choice_follows_the_device(tmp_path, tiny_model_dir, monkeypatch, cuda, overrides, served):
    import hashlib

    import service.repository as repository

    version = _copy_version(tiny_model_dir, tmp_path / TINY / "1", TINY, "1")
    fp16 = version / "model.fp16.onnx"  # the choice is what is tested: a copy of the fp32 graph will do
    shutil.copy(version / "model.onnx", fp16)
    card = json.loads((version / "card.json").read_text())
    card.update(fp16_file=fp16.name, fp16_sha256=hashlib.sha256(fp16.read_bytes()).hexdigest())
    (version / "card.json").write_text(json.dumps(card))
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    monkeypatch.setattr(repository, "_available_providers", lambda: available)
    repo = ModelRepository(tmp_path)
    settings = make_settings(tmp_path, warmup=False, **overrides)
    (mv,) = repo.scan()
    assert repo.load(mv, settings), mv.reason
    assert mv.model.path.name == served


def test_cuda_provider_options():
    from service.inference import provider_options

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_options(providers) == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert provider_options(providers, cuda_tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert provider_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
