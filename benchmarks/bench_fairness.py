"""Fairness under load: single-image latency with and without maximal requests beside it.

Starts ``python -m service`` on 127.0.0.1 with one committed model, then runs two phases of
``--seconds`` each: ``--concurrency`` clients sending one-image predicts back to back (the
baseline), and the same clients while ``--heavy`` more clients send maximal requests
(``--max-images`` images each, the binary tensor infer endpoint) back to back. Prints the
single-image p50/p99 of both phases, their ratio, and what became of the maximal requests.

    python benchmarks/bench_fairness.py --seconds 60 --concurrency 64     # the issue's goal: p99 ratio <= 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from live_service import start_service  # benchmarks/live_service.py, beside this script
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def start_server(model_src: Path, max_images: int) -> tuple[subprocess.Popen, str, Path]:
    repo = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    shutil.copytree(model_src, repo / model_src.parent.name / model_src.name)
    env = {**os.environ, "GSA_LOG_LEVEL": "WARNING", "GSA_ACCESS_LOG": "false",
           "GSA_MAX_IMAGES_PER_REQUEST": str(max_images), "GSA_JOBS_DIR": str(repo / ".jobs")}
    proc, url = start_service(repo, env, timeout_s=300)
    return proc, url, repo


def png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def infer_body(n: int, h: int, w: int, c: int) -> tuple[bytes, int]:
    data = np.random.default_rng(1).integers(0, 256, (n, h, w, c), dtype=np.uint8).tobytes()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [n, h, w, c],
                                     "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return header + data, len(header)


async def phase(url: str, model: str, card: dict, seconds: float, concurrency: int, heavy: int,
                max_images: int) -> tuple[list[float], collections.Counter, list[float], collections.Counter]:
    single = png(card["input"]["height"], card["input"]["width"])
    body, header_len = infer_body(max_images, card["input"]["height"], card["input"]["width"], card["input"]["channels"])
    light, light_status, big, big_status = [], collections.Counter(), [], collections.Counter()
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency + heavy + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def light_client() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await client.post(f"/v1/models/{model}/predict", content=single, headers={"content-type": "image/png"})
                light_status[r.status_code] += 1
                if r.status_code == 200:
                    light.append(time.perf_counter() - t0)

        async def heavy_client() -> None:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await client.post(f"/v2/models/{model}/infer", content=body, headers={
                    "content-type": "application/octet-stream", "inference-header-content-length": str(header_len)})
                error = r.json().get("error", "") if r.status_code != 200 else ""
                # refused up front (admission) or given up after being admitted (deadline passed)
                big_status[f"{r.status_code} timed out" if "timed out" in error else
                           f"{r.status_code} refused" if error else str(r.status_code)] += 1
                if r.status_code == 200:
                    big.append(time.perf_counter() - t0)
                elif r.status_code in (429, 503):
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                else:
                    return  # 413: too large even alone at the measured speed, so not worth retrying

        await asyncio.gather(*([light_client() for _ in range(concurrency)] + [heavy_client() for _ in range(heavy)]))
    return light, light_status, big, big_status


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-version", type=Path, default=ROOT / "models" / "rotmnist-r4" / "4")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--heavy", type=int, default=2, help="clients sending maximal requests in the second phase")
    p.add_argument("--max-images", type=int, default=256, help="images in a maximal request (the service's limit)")
    args = p.parse_args(argv)
    card = json.loads((args.model_version / "card.json").read_text())
    proc, url, repo = start_server(args.model_version, args.max_images)
    try:
        model = card["name"]
        base = asyncio.run(phase(url, model, card, args.seconds, args.concurrency, 0, args.max_images))
        load = asyncio.run(phase(url, model, card, args.seconds, args.concurrency, args.heavy, args.max_images))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(repo, ignore_errors=True)
    for name, (light, status, big, big_status) in (("alone", base), ("beside maximal requests", load)):
        print(f"{name}: single-image requests {sum(status.values())} {dict(status)}, "
              f"p50 {pct(light, 50) * 1e3:.0f} ms, p99 {pct(light, 99) * 1e3:.0f} ms"
              + (f"; maximal requests {dict(big_status)}, p50 {pct(big, 50):.1f} s" if big_status else ""))
    print(f"p99 ratio (beside / alone): {pct(load[0], 99) / pct(base[0], 99):.2f} "
          f"(model {model}, concurrency {args.concurrency}, {args.heavy} maximal clients of {args.max_images} images, "
          f"{args.seconds:g} s each phase)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
