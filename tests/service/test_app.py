"""The app around the models: settings, request ids and JSON logs, metrics, limits, readiness,
OpenAPI, graceful shutdown and ``python -m service``."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TINY, LiveServer, make_settings
from service.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]


def _png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GSA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("GSA_PORT", "9123")
    monkeypatch.setenv("GSA_INTRA_OP_THREADS", "3")
    monkeypatch.setenv("GSA_BATCHING__MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("GSA_MODEL_BATCHING", json.dumps({TINY: {"max_queue_delay_ms": 7, "enabled": False}}))
    monkeypatch.setenv("GSA_MAX_BODY_BYTES", "1000")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.model_dir == tmp_path and s.port == 9123 and s.intra_op_threads == 3 and s.max_body_bytes == 1000
        assert s.batching_for("other").max_batch_size == 8 and s.batching_for("other").enabled
        tiny = s.batching_for(TINY)
        assert tiny.max_batch_size == 8 and tiny.max_queue_delay_ms == 7 and not tiny.enabled
        assert get_settings() is s
    finally:
        get_settings.cache_clear()
    with pytest.raises(ValueError):
        Settings(batching={"max_batch_size": 0})


def test_request_id_in_and_out_and_in_the_json_logs(app_client, caplog):
    c = app_client(access_log=True, log_level="INFO")
    from service.logs import JsonFormatter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(JsonFormatter().format(record))
    logging.getLogger("service").addHandler(handler)
    try:
        r = c.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
        r404 = c.post("/v1/models/nope/predict", content=_png(), headers={"content-type": "image/png", "X-Request-ID": "zzz-9"})
    finally:
        logging.getLogger("service").removeHandler(handler)
    assert r.headers["x-request-id"] == "abc-123"
    assert r404.status_code == 404 and r404.headers["x-request-id"] == "zzz-9"
    lines = [json.loads(line) for line in records]
    access = [line for line in lines if line["logger"] == "service.access"]
    assert any(line["request_id"] == "abc-123" and line["status"] == 200 for line in access)
    assert any(line["request_id"] == "zzz-9" and line["status"] == 404 for line in access)
    # background work (older versions still loading after ready) logs without a request id
    assert any(line.get("request_id") == "zzz-9" and "unknown model 'nope'" in line["message"] for line in lines)
    generated = c.get("/v2/health/live", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32


def test_gpu_asked_for_but_not_in_use_warns(app_client, service_logs):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU is available here")
    c = app_client(device="cuda")
    meta = c.get(f"/v2/models/{TINY}").json()
    assert meta["state"] == "READY" and meta["execution_providers"] == ["CPUExecutionProvider"]
    warnings = [r.getMessage() for r in service_logs if r.levelno == logging.WARNING]
    assert any("GPU was asked for" in w and TINY in w for w in warnings), warnings


def test_per_model_batching_settings(app_client):
    from service.settings import BatchingOverride

    c = app_client(model_batching={TINY: BatchingOverride(enabled=False, max_queue_size=5)})
    batcher = c.app.state.server.get(TINY).batcher
    assert not batcher.config.enabled and batcher.config.max_queue_size == 5
    assert batcher.config.max_batch_size == 16  # the global value, not overridden


def test_metrics(app_client):
    c = app_client()
    assert c.post(f"/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"}).status_code == 200
    assert c.post(f"/v1/models/{TINY}/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    text = c.get("/metrics").text
    for line in [
        f'gsa_inference_requests_total{{model="{TINY}",outcome="success",version="2"}} 1.0',
        f'gsa_inference_requests_total{{model="{TINY}",outcome="unsupported_media_type",version="2"}} 1.0',
        'gsa_http_requests_total{method="POST",route="/v1/models/{model_name}/predict",status="200"} 1.0',
        f'gsa_batch_size_count{{model="{TINY}",version="2"}} 1.0',
        f'gsa_model_execution_provider_info{{model="{TINY}",provider="CPUExecutionProvider",version="2"}} 1.0',
        'gsa_model_ready{model="broken",version="1"} 0.0',
        f'gsa_queue_depth{{model="{TINY}",version="2"}} 0.0',
    ]:
        assert line in text, line
    for name in ("gsa_queue_duration_seconds_count", "gsa_compute_duration_seconds_count", "gsa_http_request_duration_seconds_count"):
        assert name in text


def test_openapi_documents_the_endpoints(app_client):
    c = app_client()
    spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{model_name}", "/v2/models/{model_name}/infer",
                 "/v2/models/{model_name}/versions/{version}/infer", "/v2/models/{model_name}/stats",
                 "/v1/models/{model_name}/predict", "/metrics"]:
        assert path in paths, path
    predict = paths["/v1/models/{model_name}/predict"]["post"]
    assert predict["summary"] and set(predict["requestBody"]["content"]) >= {"image/png", "multipart/form-data", "application/json"}
    assert c.get("/docs").status_code == 200


def test_body_limit_declared_and_streamed(app_client):
    c = app_client(max_body_bytes=2000)
    r = c.post(f"/v1/models/{TINY}/predict", content=bytes(5000), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "5000 bytes" in r.json()["error"]

    def chunks():
        for _ in range(5):
            yield bytes(1000)

    r = c.post(f"/v2/models/{TINY}/infer", content=chunks())  # no Content-Length: chunked
    assert r.status_code == 413 and "over the limit of 2000" in r.json()["error"]
    assert c.post(f"/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"}).status_code == 200


def test_unknown_routes_and_methods_answer_json(app_client):
    c = app_client()
    r = c.get("/v3/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
    r = c.get(f"/v2/models/{TINY}/infer")
    assert r.status_code == 405 and r.json()["error"]


def test_not_ready_while_models_load(model_repo, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app
    import service.runtime as runtime

    gate = threading.Event()
    real = runtime.open_session

    def slow_open(entry, settings):
        gate.wait(10)
        return real(entry, settings)

    monkeypatch.setattr(runtime, "open_session", slow_open)
    with TestClient(create_app(make_settings(model_repo))) as c:
        assert c.get("/v2/health/live").status_code == 200
        r = c.get("/v2/health/ready")
        assert r.status_code == 400 and "loading" in r.json()["error"]
        r = c.post(f"/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 503 and "LOADING" in r.json()["error"] and r.headers["retry-after"] == "1"
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_ready_once_each_model_can_serve_while_older_versions_load(model_repo, monkeypatch):
    """Each model's newest version loads first; the server is ready when every model has a ready
    version (older ones still loading answer 503), and, when strict, only once every version is."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    import service.runtime as runtime

    gate = threading.Event()
    real = runtime.open_session
    order = []

    def slow_old(entry, settings):
        order.append((entry.name, entry.version))
        if entry.version == "1" and entry.name == TINY:
            gate.wait(10)
        return real(entry, settings)

    monkeypatch.setattr(runtime, "open_session", slow_old)
    for strict in (False, True):
        gate.clear()
        order.clear()
        with TestClient(create_app(make_settings(model_repo, strict_readiness=strict, load_concurrency=1))) as c:
            deadline = time.monotonic() + 60
            while (TINY, "1") not in order:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.2)
            assert order[0] == (TINY, "2")  # the newest version first
            assert c.get(f"/v2/models/{TINY}/versions/2/ready").status_code == 200
            assert c.get(f"/v2/models/{TINY}/versions/1/ready").status_code == 400
            r = c.get("/v2/health/ready")
            assert r.status_code == (400 if strict else 200), r.text
            r = c.post(f"/v1/models/{TINY}/versions/1/predict", content=_png(), headers={"content-type": "image/png"})
            assert r.status_code == 503 and "LOADING" in r.json()["error"]
            gate.set()
            deadline = time.monotonic() + 60
            while c.get(f"/v2/models/{TINY}/versions/1/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = c.get("/v2/health/ready")  # strict: never, the broken model failed
            assert r.status_code == (400 if strict else 200) and (not strict or "failed" in r.json()["error"])


def test_graceful_shutdown_finishes_in_flight_requests(model_repo):
    server = LiveServer(make_settings(model_repo)).__enter__()
    try:
        batcher = server.app.state.server.get(TINY).batcher
        real = batcher._run
        computing = threading.Event()
        batcher._run = lambda images: (computing.set(), time.sleep(0.5), real(images))[2]
        result = {}

        def call():
            result["r"] = httpx.post(f"{server.url}/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"}, timeout=10)

        t = threading.Thread(target=call)
        t.start()
        assert computing.wait(20)  # the request is computing (waited for: a loaded machine is slow to connect)
        server.server.should_exit = True
        t.join(10)
        assert result["r"].status_code == 200
    finally:
        server.__exit__(None, None, None)
    assert not server.thread.is_alive()
    assert server.app.state.server.find(TINY).state.value == "UNLOADED"


def test_python_m_service(model_repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GSA_MODEL_DIR": str(model_repo), "GSA_PORT": str(port), "GSA_INTRA_OP_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once shut down
    assert "Application shutdown complete" in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("ready on" in line["message"] or "loaded on" in line["message"] for line in lines)
    assert "torch" not in out  # sanity: nothing from the training side was imported


def test_service_imports_neither_torch_nor_training():
    code = "import sys, service.app, service.__main__; bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'training')]; print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", [f"/v1/models/{TINY}/predict", "/v1/jobs/slides", "/v1/jobs/patches"])
def test_non_utf8_json_is_a_400_on_a_connection_that_stays_usable(live_server, path):
    """A JSON body that is not UTF-8 is a client error that says so, and the kept-alive connection
    answers the next request (before: 500 UnicodeDecodeError, then a reset connection)."""
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        r = client.post(path, content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text
        ok = client.post(f"/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"})
        assert ok.status_code == 200, ok.text
