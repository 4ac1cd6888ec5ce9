"""Start ``python -m service`` on a free port of 127.0.0.1 for a benchmark and wait until it is ready
(imported by the benchmarks beside this file)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start_service(model_dir: Path, env: dict[str, str], timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """The server process and its URL, once ``/v2/health/ready`` answers 200; killed on time-out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                             "--model-dir", str(model_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the service did not get ready in {timeout_s:g} s")
