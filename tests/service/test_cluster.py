"""The service on Ray Serve (``python -m service.cluster``), started here as a user starts it: a local
Ray instance with 2 CPUs on loopback, the proxy on 127.0.0.1, replicas autoscaling between 1 and 2.

Shown: under load the deployment grows to two replicas and both answer (``X-GSA-Replica``); a replica
killed with SIGKILL mid-load costs the clients nothing beyond retried requests that then succeed, and
Serve starts a new one; the official ``tritonclient`` works against it unmodified; the app's own
errors come through the proxy; every socket of the cluster is on loopback.

Ray Serve is the optional ``distributed`` extra: without it these tests skip, except under CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY
from loopback import descendants, sockets_off_loopback

ROOT = Path(__file__).resolve().parents[2]
HEADER = "x-gsa-replica"
START_TIMEOUT_S = 240  # Ray, the Serve controller, the proxy and a replica on 2 busy cores
RETRIES = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_serve_or_skip() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray[serve] is not installed (CI installs the 'distributed' extra: scripts/test.sh)")
        pytest.skip("ray[serve] is not installed: pip install -e '.[distributed]'")


class Cluster:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def replica_pids(self) -> list[int]:
        """The processes of the live Serve replicas (Ray names them ``ray::ServeReplica:<app>:<deployment>``)."""
        found = []
        for pid in descendants(self.process.pid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith("ray::ServeReplica:gsa-serve"):
                found.append(pid)
        return found


@pytest.fixture(scope="module")
def cluster(model_repo, tmp_path_factory):
    _ray_serve_or_skip()
    port = _free_port()
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    env = {**os.environ, "GSA_MODEL_DIR": str(model_repo), "GSA_JOBS_DIR": str(log.parent / "jobs"),
           "GSA_LOG_LEVEL": "WARNING", "GSA_INTRA_OP_THREADS": "1", "GSA_ACCESS_LOG": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "service.cluster", "--port", str(port), "--num-cpus", "2", "--replica-cpus", "0.5",
           "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing", "2", "--upscale-delay-s", "2"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = Cluster(process, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"service.cluster exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(running.url + "/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield running
    finally:
        process.send_signal(signal.SIGINT)  # serve.shutdown() and ray.shutdown(): the replicas and Ray end
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in descendants(process.pid) | {process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def reference(model_repo):
    return ort.InferenceSession(str(model_repo / TINY / "2" / "model.onnx"), providers=["CPUExecutionProvider"])


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def _body(images: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.ravel().tolist()}]}


class Load:
    """Clients in threads, each sending one 4-image infer after another; a failed attempt (connection
    error or 5xx) is retried up to ``RETRIES`` times; every answer is checked against the reference."""

    def __init__(self, cluster: Cluster, reference: ort.InferenceSession, clients: int):
        self.cluster, self.reference, self.clients = cluster, reference, clients
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.replicas: Counter[str] = Counter()
        self.ok = self.retried = self.failed = self.wrong = self.in_flight = 0
        self.first_errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def seen(self) -> set[str]:
        with self.lock:
            return set(self.replicas)

    def _client(self, seed: int) -> None:
        with httpx.Client(base_url=self.cluster.url, timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                images = _images(4, seed * 10_000 + n)
                n += 1
                for attempt in range(RETRIES + 1):
                    with self.lock:
                        self.in_flight += 1
                    try:
                        r = client.post(f"/v2/models/{TINY}/infer", json=_body(images))
                        error = None if r.status_code < 500 else f"{r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as e:
                        r, error = None, f"{type(e).__name__}: {e}"
                    finally:
                        with self.lock:
                            self.in_flight -= 1
                    if error is None:
                        break
                    with self.lock:
                        self.retried += 1
                        self.first_errors.append(error)
                    time.sleep(0.25 * (attempt + 1))
                with self.lock:
                    if error is not None or r.status_code != 200:
                        self.failed += 1
                        self.first_errors.append(error or f"{r.status_code} {r.text[:200]}")
                        continue
                    self.ok += 1
                    self.replicas[r.headers[HEADER]] += 1
                probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
                expected = self.reference.run(["probabilities"], {"image": images})[0]
                if not np.allclose(np.array(probs["data"]).reshape(expected.shape), expected, atol=1e-5):
                    with self.lock:
                        self.wrong += 1


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.2)


def test_load_scales_to_two_replicas_and_both_serve(cluster, reference):
    with Load(cluster, reference, clients=8) as load:
        _wait_for(lambda: len(load.seen()) >= 2 and min(load.replicas.values()) >= 5, 180,
                  "two replicas each answering at least 5 requests")
    assert load.failed == 0 and load.wrong == 0, (load.failed, load.wrong, load.first_errors[:3])
    assert len(cluster.replica_pids()) == 2
    assert load.retried == 0, load.first_errors[:3]  # nothing died here: no request needed a second try


def test_a_replica_killed_mid_load_costs_only_retries(cluster, reference):
    with Load(cluster, reference, clients=8) as load:
        _wait_for(lambda: len(load.seen()) >= 2, 180, "two replicas answering")
        before = load.seen()
        victim = cluster.replica_pids()[0]
        _wait_for(lambda: load.in_flight >= 4, 30, "requests in flight")
        os.kill(victim, signal.SIGKILL)
        in_flight_at_kill, answered_at_kill = load.in_flight, dict(load.replicas)
        # Serve replaces it (the load keeps the autoscaler at 2): a new replica answers
        _wait_for(lambda: load.seen() - before, 180, "a new replica answering after the kill")
        after_new = dict(load.replicas)
        time.sleep(2.0)
    assert victim not in cluster.replica_pids()
    assert load.failed == 0, (load.failed, load.first_errors[:5])
    assert load.wrong == 0
    # the killed process was one of the two serving replicas: one of them, which had answered, answers
    # nothing more once its successor does (answers on their way at the kill may still be counted)
    silent = [r for r in before if load.replicas[r] == after_new[r] and answered_at_kill.get(r, 0) > 0]
    assert len(silent) == 1, (before, answered_at_kill, after_new, dict(load.replicas))
    print(f"killed replica pid {victim} with {in_flight_at_kill} requests in flight: {load.ok} answered, "
          f"{load.retried} attempts retried; replicas {dict(load.replicas)}; first errors: {load.first_errors[:3]}")


def test_tritonclient_works_unmodified(cluster, reference):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{cluster.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata()["name"] == "gsa-serve"
        meta = client.get_model_metadata(TINY)
        assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 16, 16, 1]}]
        images = _images(3, seed=7)
        for binary in (False, True):
            inp = httpclient.InferInput("image", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images, binary_data=binary)
            out = client.infer(TINY, [inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)])
            expected = reference.run(["probabilities"], {"image": images})[0]
            np.testing.assert_allclose(out.as_numpy("probabilities"), expected, atol=1e-6)
    finally:
        client.close()


def test_the_apps_errors_come_through_the_proxy(cluster):
    r = httpx.post(f"{cluster.url}/v2/models/{TINY}/infer", json={"inputs": [{"name": "image", "shape": [1, 16, 16, 1],
                                                                              "datatype": "UINT8", "data": [1, 2]}]})
    assert r.status_code == 400 and "has 2 values" in r.json()["error"] and r.headers[HEADER], r.text
    r = httpx.get(f"{cluster.url}/v2/models/no-such-model")
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]


def test_every_socket_of_the_cluster_is_on_loopback(cluster):
    """Every connection of the cluster's processes is on loopback and the proxy listens on 127.0.0.1.
    One listener is not: Ray Serve 2.60 opens each replica's inter-deployment gRPC server on
    ``[::]:0``, hard-coded in ``ray/serve/_private/replica.py`` (ray-project/ray#64544), unused by
    the HTTP path here. It is the only exception allowed, and it is asserted to be that one."""
    pids = {cluster.process.pid} | descendants(cluster.process.pid)
    outside = set(sockets_off_loopback(pids, at_least=10))
    lines = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    offending = [line.split() for line in lines if any(pid_tag in line for pid_tag in (f"pid={p}," for p in pids))
                 and tuple(line.split()[3:5]) in outside]
    replica_listeners = [f for f in offending if f[0] == "LISTEN" and '"ray::ServeRepli"' in f[5]]
    assert [f for f in offending if f not in replica_listeners] == [], offending
    assert len(replica_listeners) <= 2  # one a replica at most
    listening = subprocess.run(["ss", "-tlnH", f"sport = :{cluster.port}"], capture_output=True, text=True, check=True).stdout
    assert listening.split()[3] == f"127.0.0.1:{cluster.port}", listening
