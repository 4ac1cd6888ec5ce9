"""The model repository (what is valid and why not) and the model server on top of it (what is
served, what is refused, which version is default)."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Callable

import pytest

from conftest import TINY, _copy_version, make_settings
from gsa_contract import CardError, ModelCard
from service.errors import ModelNotReady, NotFound
from service.metrics import ServiceMetrics
from service.repository import ModelRepository, version_key
from service.runtime import ModelServer, ModelState


def test_version_order():
    versions = ["10", "2", "1", "1.10.0", "1.2.0", "beta"]
    assert sorted(versions, key=version_key) == ["1", "1.2.0", "1.10.0", "2", "10", "beta"]


def _with_server(root, check: Callable[[ModelServer], None], **overrides) -> None:
    """Start a model server on ``root``, wait until it has loaded everything, run ``check`` on it."""
    async def main() -> None:
        server = ModelServer(make_settings(root, warmup=False, **overrides), ServiceMetrics())
        server.start()
        await asyncio.wait_for(server.loaded.wait(), 60)
        try:
            check(server)
        finally:
            await server.stop()

    asyncio.run(main())


def _copies(tmp_path, tiny_model_dir, versions: dict[str, dict]):
    for version, changes in versions.items():
        _copy_version(tiny_model_dir, tmp_path / TINY / version, TINY, version, changes)
    return tmp_path


def _card(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "card.json").read_text())


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sha256": "f" * 64}, "sha256 of model.onnx"),
        ({"labels": ["a", "b"]}, "labels and group imply ['N', 2]"),
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
    def check(server: ModelServer) -> None:
        broken = server.find(TINY, "2")
        assert broken.state is ModelState.FAILED and words in broken.reason, broken.reason
        assert broken.served is None
        assert server.get(TINY).version == "1"  # newest *ready* version
        with pytest.raises(ModelNotReady) as err:
            server.get(TINY, "2")
        assert words in err.value.message

    _with_server(_copies(tmp_path, tiny_model_dir, {"1": {}, "2": changes}), check)


def test_missing_and_unparsable_files(tmp_path, tiny_model_dir):
    repo_dir = tmp_path / "r"
    _copy_version(tiny_model_dir, repo_dir / TINY / "1", TINY, "1")
    _copy_version(tiny_model_dir, repo_dir / TINY / "2", TINY, "2")
    _copy_version(tiny_model_dir, repo_dir / TINY / "3", TINY, "3")
    (repo_dir / TINY / "2" / "model.onnx").unlink()
    (repo_dir / TINY / "3" / "card.json").write_text("{ nope")
    (repo_dir / ".hidden").mkdir()
    (repo_dir / "README.md").write_text("not a model")
    entries = {e.version: e for e in ModelRepository(repo_dir).scan()}
    assert sorted(entries) == ["1", "2", "3"] and {e.name for e in entries.values()} == {TINY}
    assert "model.onnx is missing" in entries["2"].error and entries["2"].card is None
    assert "not valid JSON" in entries["3"].error
    assert entries["1"].valid and entries["1"].card.version == "1"

    def check(server: ModelServer) -> None:
        assert list(server.versions) == [TINY]
        assert "model.onnx is missing" in server.find(TINY, "2").reason
        assert server.find(TINY, "3").state is ModelState.FAILED
        assert server.get(TINY, "1").session is not None

    _with_server(repo_dir, check)


def test_corrupt_graph_with_matching_checksum(tmp_path, tiny_model_dir):
    import hashlib

    folder = _copy_version(tiny_model_dir, tmp_path / TINY / "1", TINY, "1")
    (folder / "model.onnx").write_bytes(b"not onnx")
    card = json.loads((folder / "card.json").read_text())
    card["sha256"] = hashlib.sha256(b"not onnx").hexdigest()
    (folder / "card.json").write_text(json.dumps(card))
    (entry,) = ModelRepository(tmp_path).scan()
    assert entry.valid  # the checksum matches: only loading finds out

    def check(server: ModelServer) -> None:
        mv = server.find(TINY, "1")
        assert mv.state is ModelState.FAILED and mv.reason

    _with_server(tmp_path, check)


def test_unknown_names(tmp_path, tiny_model_dir):
    def check(server: ModelServer) -> None:
        with pytest.raises(NotFound, match="unknown model 'x'"):
            server.get("x")
        with pytest.raises(NotFound, match="no version '7'"):
            server.get(TINY, "7")

    _with_server(_copies(tmp_path, tiny_model_dir, {"1": {}}), check)


def test_committed_cards_round_trip():
    """Every committed card reads into the typed card and writes back as the same JSON."""
    from pathlib import Path

    cards = sorted((Path(__file__).resolve().parents[2] / "models").glob("*/*/card.json"))
    assert cards
    for path in cards:
        data = json.loads(path.read_text())
        assert ModelCard.from_dict(data).to_dict() == data, path


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

    import service.runtime as runtime

    version = _copy_version(tiny_model_dir, tmp_path / TINY / "1", TINY, "1")
    fp16 = version / "model.fp16.onnx"  # the choice is what is tested: a copy of the fp32 graph will do
    shutil.copy(version / "model.onnx", fp16)
    card = json.loads((version / "card.json").read_text())
    card.update(fp16_file=fp16.name, fp16_sha256=hashlib.sha256(fp16.read_bytes()).hexdigest())
    (version / "card.json").write_text(json.dumps(card))
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: available)
    (entry,) = ModelRepository(tmp_path).scan()
    session = runtime.open_session(entry, make_settings(tmp_path, warmup=False, **overrides))
    assert session.path.name == served


def test_cuda_provider_options():
    from service.inference import provider_options

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_options(providers) == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert provider_options(providers, cuda_tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert provider_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
