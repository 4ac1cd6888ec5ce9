"""Fixtures: a model repository exported by the project's own code, apps and a live server.

The tiny R4 net (``gsa_tiny_r4``, 16x16 greyscale, 10 classes) is exported once per session with
``training.export.export_model`` when it exists; until then a minimal exporter below produces the
same contract (uint8 NHWC in; logits, probabilities, orientation_responses, features out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.settings import BatchingSettings, Settings

# slide and patch scoring fixtures (session-scoped, so registered here once)
from scoring_fixtures import path_model, path_model_repo, synthetic_slides  # noqa: E402,F401

TINY = "gsa_tiny"


def _export_with_torch(out_dir: Path, name: str, version: str) -> Path:
    """Stand-in for training.export.export_model: torch.onnx.export of the wrapped net."""
    import torch
    import torch.nn as nn

    from training.groups import get_group
    from training.networks import create_model

    torch.manual_seed(0)
    net = create_model("gsa_tiny_r4").eval()
    for layer in net.attention_layers():
        layer.chunk_queries = 64  # a fixed chunk size: the batch dimension stays dynamic in the graph

    class Wrapped(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor):
            x = image.permute(0, 3, 1, 2).float() / 255.0  # B, C, H, W
            out = self.net.forward_all(x)
            return out["logits"], out["logits"].softmax(-1), out["orientation_responses"], out["features"]

    cfg = net.config
    folder = out_dir / name / version
    folder.mkdir(parents=True)
    example = torch.zeros(2, cfg.img_size, cfg.img_size, cfg.in_chans, dtype=torch.uint8)
    with torch.no_grad():
        torch.onnx.export(
            Wrapped(net), (example,), str(folder / "model.onnx"), input_names=["image"],
            output_names=["logits", "probabilities", "orientation_responses", "features"],
            dynamic_axes={"image": {0: "N"}}, opset_version=18, dynamo=False,
        )
    group = get_group(cfg.group)
    card = {
        "name": name, "version": version, "task": "classification", "labels": cfg.labels(),
        "input": {"height": cfg.img_size, "width": cfg.img_size, "channels": cfg.in_chans,
                  "dtype": "uint8", "layout": "NHWC"},
        "group": {"name": group.name, "order": group.order, "elements": [
            {"index": i, "angle": group.angle_degrees(i), "reflection": group.reflection(i)} for i in range(group.order)
        ]},
        "mpp": None, "metrics": {}, "opset": 18,
        "sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(),
        "command": "tests/service/conftest.py",
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    return folder


def _export(out_dir: Path, name: str, version: str) -> Path:
    """``<out_dir>/<name>/<version>/`` holding model.onnx and card.json, made by the project's
    exporter when it exists."""
    try:
        from training.export import export_model
    except ImportError:
        return _export_with_torch(out_dir, name, version)
    import torch

    from training.networks import create_model

    torch.manual_seed(0)
    result = export_model(create_model("gsa_tiny_r4").eval(), out_dir, name, version, features=True,
                          command="tests/service/conftest.py")
    folder = out_dir / name / version
    if not (folder / "model.onnx").is_file() and isinstance(result, (str, Path)):
        produced = Path(result).parent if Path(result).is_file() else Path(result)
        if (produced / "model.onnx").is_file() and produced != folder:
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(produced, folder)
    assert (folder / "model.onnx").is_file() and (folder / "card.json").is_file(), f"export_model wrote no {folder}"
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One exported version of the tiny model: ``<tmp>/gsa_tiny/1/{model.onnx, card.json}``."""
    return _export(tmp_path_factory.mktemp("export"), TINY, "1")


def _copy_version(src: Path, dst: Path, name: str, version: str, card_changes: dict | None = None) -> Path:
    """Copy an exported version under another name/version, with card fields changed."""
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card.update({"name": name, "version": version, **(card_changes or {})})
    (dst / "card.json").write_text(json.dumps(card))
    return dst


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, tiny_model_dir) -> Path:
    """gsa_tiny versions 1 and 2 (2 is the default), and a model whose graph fails its checksum."""
    root = tmp_path_factory.mktemp("models")
    _copy_version(tiny_model_dir, root / TINY / "1", TINY, "1")
    _copy_version(tiny_model_dir, root / TINY / "2", TINY, "2")
    _copy_version(tiny_model_dir, root / "broken" / "1", "broken", "1", {"sha256": "0" * 64})
    return root


def make_settings(model_dir: Path, **overrides) -> Settings:
    base = dict(
        model_dir=model_dir, log_json=True, log_level="WARNING", access_log=False, intra_op_threads=1,
        batching=BatchingSettings(max_batch_size=16, max_queue_delay_ms=2.0, max_queue_size=64),
    )
    return Settings(**{**base, **overrides})


def wait_ready(get, timeout_s: float = 30.0) -> None:
    """Until the server is ready and every version has loaded or failed: it is ready once each
    model's newest version is, and older versions load after those (tests use them at once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if get("/v2/health/ready").status_code == 200:
            break
        time.sleep(0.02)
    else:
        raise TimeoutError("server did not become ready")
    while time.monotonic() < deadline:
        r = get("/v1/models")
        if r.status_code != 200 or all(v["state"] not in ("LOADING", "UNLOADED")
                                       for m in r.json()["models"] for v in m["versions"]):
            return  # (401: a test with API keys on; its own requests wait if they must)
        time.sleep(0.02)
    raise TimeoutError("the older versions did not finish loading")


@pytest.fixture
def app_client(model_repo):
    """A TestClient with the lifespan running, ready; ``app_client(**settings)`` for other settings."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    clients = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(overrides.pop("model_dir", model_repo), **overrides)))
        client.__enter__()
        clients.append(client)
        wait_ready(client.get)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, settings: Settings):
        import uvicorn

        from service.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        wait_ready(lambda path: httpx.get(self.url + path))
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def jobs_client(app_client, path_model_repo, data_dir, tmp_path):
    """``jobs_client(**settings)``: an app serving the pathology models with the data directory of
    the requesting module's ``data_dir`` fixture and a jobs directory."""
    def make(**overrides):
        base = dict(model_dir=path_model_repo, jobs_dir=tmp_path / "jobs", data_dir=data_dir, warmup=False)
        return app_client(**{**base, **overrides})

    return make


@pytest.fixture
def service_logs():
    """Records of the ``service`` loggers (they do not propagate to the root, so not caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger("service").addHandler(handler)
    yield records
    logging.getLogger("service").removeHandler(handler)


@pytest.fixture(scope="module")
def live_server(model_repo):
    with LiveServer(make_settings(model_repo)) as server:
        yield server
