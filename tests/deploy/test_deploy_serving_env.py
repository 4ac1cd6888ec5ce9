"""The serving image's environment, built here the way the Dockerfile builds it, and served from.

There is no Docker engine here, so the build stage is replayed: its COPY instructions into a fresh
source tree, then its RUN command (``deploy/install-serve.sh``) with the CPU variant's extra into a
fresh virtualenv. Then ``python -m service`` from that virtualenv serves the committed ``models/``
until ready, and SIGTERM with a request in flight lets the request finish (the image's stop path).
Needs PyPI (pip's cache makes it fast: about 20 s on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import shutil
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

from deploy_files import ROOT, parse_dockerfile

pytestmark = pytest.mark.slow

VENV_IN_IMAGE = "/opt/venv"
MODEL = "rotmnist-r4"  # committed in models/: 28x28 greyscale


def _replay_copy(args: list[str], workdir: Path) -> None:
    *sources, dest = args
    target = workdir / dest
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        else:
            into = target / path.name if dest.endswith("/") or len(sources) > 1 else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv built by the Dockerfile's build stage, replayed (once per session)."""
    dockerfile = parse_dockerfile()
    build = dockerfile.stage("build")
    assert build.base == "base-cpu"
    tmp = tmp_path_factory.mktemp("serving")
    (workdir,) = [Path(w.args) for w in build.all("WORKDIR")]
    src = tmp / workdir.relative_to("/")
    src.mkdir(parents=True)
    for copy in build.all("COPY"):
        assert "from" not in copy.flags
        _replay_copy(copy.words(), src)
    (run,) = build.all("RUN")
    venv = tmp / "venv"
    command = run.args.replace(VENV_IN_IMAGE, str(venv))
    assert command != run.args, f"the build no longer installs into {VENV_IN_IMAGE}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(dockerfile.env("build"))  # SERVE_EXTRA of the CPU variant
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3: this project's Python
    t0 = time.perf_counter()
    r = subprocess.run(["sh", "-c", command], cwd=src, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, f"{command} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    print(f"serving environment built in {time.perf_counter() - t0:.1f} s")
    return venv


def _python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def _outside_repo_env(venv: Path, tmp: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSA_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", GSA_HOST="127.0.0.1", GSA_MODEL_DIR=str(ROOT / "models"),
               GSA_JOBS_DIR=str(tmp / "jobs"), GSA_INTRA_OP_THREADS="1", GSA_LOG_JSON="true", **settings)
    return env


def test_serving_environment_has_no_torch_and_one_onnx_runtime(serving_venv, tmp_path):
    code = (
        "import importlib.metadata as md, importlib.util, json, service, onnxruntime;"
        "print(json.dumps({'dists': sorted(d.metadata['Name'].lower() for d in md.distributions()),"
        " 'training': importlib.util.find_spec('training') is not None, 'service': service.__file__,"
        " 'providers': onnxruntime.get_available_providers()}))"
    )
    r = subprocess.run([_python(serving_venv), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=_outside_repo_env(serving_venv, tmp_path))
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    dists = set(found["dists"])
    assert not {d for d in dists if d.startswith("torch")}, "torch in the serving environment"
    assert "onnxruntime" in dists and "onnxruntime-gpu" not in dists
    assert {"fastapi", "uvicorn", "pydantic-settings"} <= dists
    assert not found["training"], "training code in the serving environment"
    assert Path(found["service"]).is_relative_to(serving_venv), found["service"]
    assert found["providers"][-1] == "CPUExecutionProvider"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(venv: Path, tmp: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = _outside_repo_env(venv, tmp, GSA_PORT=str(port), **settings)
    proc = subprocess.Popen([_python(venv), "-m", "service"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the service did not get ready:\n{proc.communicate()[0].decode()[-4000:]}")
        time.sleep(0.1)


def _healthcheck(venv: Path, url: str) -> int:
    env = {**os.environ, "GSA_PORT": url.rsplit(":", 1)[1]}
    return subprocess.run([_python(venv), str(ROOT / "deploy" / "healthcheck.py")], env=env,
                          capture_output=True, timeout=30).returncode


def _infer_in_background(url: str, n: int) -> tuple[threading.Thread, dict]:
    rng = np.random.default_rng(0)
    body = {"inputs": [{"name": "image", "shape": [n, 28, 28, 1], "datatype": "UINT8",
                        "data": rng.integers(0, 256, (n, 28, 28, 1)).ravel().tolist()}]}
    result: dict = {}

    def call() -> None:
        try:
            result["response"] = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=60)
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["at"] = time.perf_counter()

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    while True:  # until the server holds it (the /metrics request itself is the other one)
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        line = next(m for m in metrics.splitlines() if m.startswith("gsa_http_requests_in_flight"))
        if float(line.split()[-1]) >= 2:
            return thread, result
        assert time.monotonic() < deadline and thread.is_alive(), result
        time.sleep(0.005)


def test_serves_models_until_sigterm_drains_in_flight_requests(serving_venv, tmp_path):
    proc, url = _start(serving_venv, tmp_path)
    try:
        assert _healthcheck(serving_venv, url) == 0
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert MODEL in json.dumps(models)
        thread, result = _infer_in_background(url, 32)
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    response = result.get("response")
    assert response is not None and response.status_code == 200, (result, out[-3000:])
    assert result["at"] > signalled, "the request was not in flight at SIGTERM"
    shapes = {o["name"]: o["shape"] for o in response.json()["outputs"]}
    assert shapes["probabilities"] == [32, 10]
    assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]
    assert "Application shutdown complete" in out and "all models unloaded" in out
    assert _healthcheck(serving_venv, url) == 1  # nothing answers any more


def test_graceful_shutdown_setting_bounds_the_drain(serving_venv, tmp_path):
    """GSA_GRACEFUL_SHUTDOWN_S reaches uvicorn: past it, in-flight requests are cut (which is why
    the compose stop grace period must exceed it, and the setting the request timeout)."""
    proc, url = _start(serving_venv, tmp_path, GSA_GRACEFUL_SHUTDOWN_S="0.2")
    try:
        thread, result = _infer_in_background(url, 64)  # two batches of 32, about 2.5 s here
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "response" not in result or result["response"].status_code != 200, out[-3000:]
    assert "timeout graceful shutdown exceeded" in out
