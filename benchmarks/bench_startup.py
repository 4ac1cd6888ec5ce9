"""Start-up time of ``python -m service``: seconds from launch to ``/v2/health/ready`` = 200 (and to
every version READY), on 127.0.0.1 with the committed ``models/`` unless ``--model-dir``.

    python benchmarks/bench_startup.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def one_run(model_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--model-dir", str(model_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready_s = all_s = None
    try:
        while time.perf_counter() - t0 < 300:
            try:
                if ready_s is None and httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    ready_s = time.perf_counter() - t0
                if ready_s is not None:
                    index = httpx.post(url + "/v2/repository/index", timeout=1).json()
                    if all(v["state"] != "LOADING" for v in index):
                        all_s = time.perf_counter() - t0
                        break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)
    if ready_s is None or all_s is None:
        raise RuntimeError("the server did not become ready in 300 s")
    return ready_s, all_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GSA_LOG_LEVEL": "WARNING", "GSA_AUTH": "off"}
    runs = [one_run(args.model_dir, env) for _ in range(args.runs)]
    for ready_s, all_s in runs:
        print(f"ready {ready_s:.2f} s, every version loaded {all_s:.2f} s")
    print(f"median: ready {statistics.median(r for r, _ in runs):.2f} s, "
          f"every version loaded {statistics.median(a for _, a in runs):.2f} s")


if __name__ == "__main__":
    main()
