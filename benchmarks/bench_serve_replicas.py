"""Serving through Ray Serve replicas against the plain service, in one run, on loopback.

Configurations, one after another on the same machine and the same model (each started, measured
at every concurrency level, stopped):

- ``plain``: ``python -m service`` (one process, ONNX Runtime with ``--threads`` threads);
- ``serve-1``: ``python -m service.cluster`` with 1 replica using ``--threads`` threads;
- ``serve-2``: the same with 2 replicas, each with ``--threads / 2`` threads (the same cores);
- ``plain`` again at the end, to show how much the machine drifted during the run.

Each level sends one-image binary infer requests from ``concurrency`` keep-alive connections for
``--seconds`` and prints images/s, p50/p99 latency and errors. The Ray clusters are local (Ray on
127.0.0.1, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) with ``--threads`` CPUs.

    python benchmarks/bench_serve_replicas.py                      # rotmnist-r4, concurrency 16 and 64
    python benchmarks/bench_serve_replicas.py --model rotmnist-z2 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import find_model, free_port, infer_request, load, start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start_cluster(model_dir: Path, port: int, replicas: int, threads: int, args) -> subprocess.Popen:
    env = {**os.environ, "GSA_MODEL_DIR": str(model_dir), "GSA_JOBS_DIR": f"/tmp/bench-serve-jobs-{os.getpid()}",
           "GSA_INTRA_OP_THREADS": str(threads), "GSA_ACCESS_LOG": "false", "GSA_LOG_LEVEL": "WARNING",
           "GSA_BATCHING__MAX_BATCH_SIZE": str(args.max_batch_size), "GSA_BATCHING__MAX_QUEUE_SIZE": "4096",
           "GSA_REQUEST_TIMEOUT_S": "60", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "service.cluster", "--port", str(port), "--num-cpus", str(args.threads),
           "--replica-cpus", str(args.threads / replicas), "--min-replicas", str(replicas), "--max-replicas",
           str(replicas), "--max-ongoing", "256"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        if proc.poll() is not None:
            raise RuntimeError("service.cluster exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200:
                # every replica ready: each answers in turn (the header names it)
                seen = {httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).headers["x-gsa-replica"]
                        for _ in range(4 * replicas)}
                if len(seen) == replicas:
                    print(f"  serve-{replicas}: ready in {time.monotonic() - t0:.0f} s", flush=True)
                    return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_cluster(proc)
    raise TimeoutError("the Serve application did not become ready")


def stop_cluster(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure(label: str, port: int, pid: int, payloads: list[bytes], levels: list[int], args) -> dict[int, dict]:
    asyncio.run(load(port, payloads, 4, 100, 3.0, pid))  # warm-up
    out = {}
    for c in levels:
        r = out[c] = asyncio.run(load(port, payloads, c, 10**9, args.seconds, pid))
        print(f"{label:<9} {c:>5} {r['requests']:>9} {r['errors']:>6} {r['images_per_s']:>9.1f} "
              f"{r['p50']:>9.1f} {r['p99']:>9.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="rotmnist-r4")
    p.add_argument("--concurrency", default="16,64")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=2, help="cores for the service (split between the replicas)")
    p.add_argument("--max-batch-size", type=int, default=16)
    args = p.parse_args(argv)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    levels = [int(c) for c in args.concurrency.split(",")]
    name, folder, card = find_model(args.model_dir, args.model)
    # a repository of that one version: every configuration loads only what it serves, and no older
    # version loads in the background while a level is measured
    repo = tempfile.TemporaryDirectory(prefix="bench-serve-")
    (Path(repo.name) / name).mkdir()
    (Path(repo.name) / name / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    args.model_dir = Path(repo.name)
    shape = (card["input"]["height"], card["input"]["width"], card["input"]["channels"])
    images = np.random.default_rng(0).integers(0, 256, (32, *shape), dtype=np.uint8)
    payloads = [infer_request(name, img) for img in images]
    print(f"model {name}/{folder.name} {shape}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.threads} threads in all, max batch {args.max_batch_size}, {args.seconds:g} s a level")
    print(f"{'':<9} {'conc':>5} {'requests':>9} {'errors':>6} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
    service_args = argparse.Namespace(max_batch_size=args.max_batch_size, delay_ms=2.0, threads=args.threads,
                                      no_spinning=False)
    results: dict[str, dict[int, dict]] = {}
    for label in ("plain", "serve-1", "serve-2", "plain-end"):
        port = free_port()
        if label.startswith("plain"):
            proc = start_server(args.model_dir, port, True, service_args)
            try:
                results[label] = measure(label, port, proc.pid, payloads, levels, args)
            finally:
                stop_server(proc)
        else:
            replicas = int(label[-1])
            proc = start_cluster(args.model_dir, port, replicas, max(1, args.threads // replicas), args)
            try:
                results[label] = measure(label, port, proc.pid, payloads, levels, args)
            finally:
                stop_cluster(proc)
    print("\nimages/s relative to the plain service (mean of its first and last runs):")
    for c in levels:
        plain = (results["plain"][c]["images_per_s"] + results["plain-end"][c]["images_per_s"]) / 2
        print(f"  concurrency {c}: " + ", ".join(f"{k} {results[k][c]['images_per_s'] / plain:.2f}x"
                                                 for k in ("serve-1", "serve-2")))
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
