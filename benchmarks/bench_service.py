"""Load benchmark of the inference service against the raw ONNX Runtime session, on loopback.

Starts ``python -m service`` in a subprocess (batching on, then off), drives it with a minimal
keep-alive HTTP/1.1 client (so that the client costs the shared CPU as little as possible) at
concurrency 1, 4, 16 and 64, on the binary-tensor infer endpoint and the image endpoint, one image
per request, and prints throughput and p50/p95/p99 latency beside the raw session's throughput at
batch 1 and at the service's maximum batch size, measured in the same run.

    python benchmarks/bench_service.py                       # the first model under models/
    python benchmarks/bench_service.py --model-dir /tmp/m --model gsa_tiny --requests 300

With no model under ``--model-dir`` it exports the tiny test net (``gsa_tiny_r4``) to a temporary
repository first (needs the ``train`` extra). Every level is bounded by ``--requests`` and
``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- model -----------------------------------------------------------------------------------
def find_model(model_dir: Path, name: str | None) -> tuple[str, Path, dict]:
    """(name, newest version folder, card) of a model in the repository."""
    for model in sorted(p for p in model_dir.iterdir() if p.is_dir()) if model_dir.is_dir() else []:
        if name and model.name != name:
            continue
        versions = sorted((v for v in model.iterdir() if (v / "card.json").is_file()), key=lambda v: (len(v.name), v.name))
        if versions:
            return model.name, versions[-1], json.loads((versions[-1] / "card.json").read_text())
    raise FileNotFoundError(f"no model {name or ''} under {model_dir}")


def export_tiny(out_dir: Path) -> None:
    """Export the tiny test net with the project's exporter (a minimal stand-in until it exists)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from training.networks import create_model

    torch.manual_seed(0)
    net = create_model("gsa_tiny_r4").eval()
    try:
        from training.export import export_model
    except ImportError:
        export_model = None
    if export_model is not None:
        export_model(net, out_dir, "gsa_tiny", "1")
        return
    sys.path.insert(0, str(ROOT / "tests" / "service"))
    from conftest import _export_with_torch

    _export_with_torch(out_dir, "gsa_tiny", "1")


# ---- raw session -----------------------------------------------------------------------------
class RawSession:
    """The same graph in an ONNX Runtime session of this process, with the service's threads."""

    def __init__(self, graph: Path, images: np.ndarray, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), options, providers=ort.get_available_providers())
        self.images = images

    def throughput(self, batch: int, seconds: float) -> dict:
        """Images/s and CPU ms per image over ``seconds`` of back-to-back runs."""
        x = np.ascontiguousarray(np.resize(self.images, (batch, *self.images.shape[1:])))
        self.session.run(None, {"image": x})
        done, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            self.session.run(None, {"image": x})
            done += batch
        return {"images_per_s": done / (time.perf_counter() - t0), "cpu_ms": 1000 * (time.process_time() - c0) / done}


# ---- server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, batching: bool, args) -> subprocess.Popen:
    env = {
        **os.environ,
        "GSA_MODEL_DIR": str(model_dir), "GSA_HOST": "127.0.0.1", "GSA_PORT": str(port),
        "GSA_BATCHING__ENABLED": str(batching).lower(),
        "GSA_BATCHING__MAX_BATCH_SIZE": str(args.max_batch_size),
        "GSA_BATCHING__MAX_QUEUE_DELAY_MS": str(args.delay_ms),
        "GSA_BATCHING__MAX_QUEUE_SIZE": "4096",
        "GSA_INTRA_OP_THREADS": str(args.threads),
        "GSA_ALLOW_SPINNING": str(not args.no_spinning).lower(),
        "GSA_REQUEST_TIMEOUT_S": "60",
        "GSA_ACCESS_LOG": "false", "GSA_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the service exited during start-up")
        try:
            status, _ = asyncio.run(_one_get(port, "/v2/health/ready"))
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("the service did not become ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------
class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _one_get(port: int, path: str) -> tuple[int, bytes]:
    conn = await Connection.open(port)
    try:
        return await conn.request(http_request("GET", path))
    finally:
        conn.close()


def infer_request(model: str, image: np.ndarray) -> bytes:
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *image.shape],
                    "parameters": {"binary_data_size": image.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return http_request("POST", f"/v2/models/{model}/infer", header + image.tobytes(), {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})


def predict_request(model: str, image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return http_request("POST", f"/v1/models/{model}/predict", buf.getvalue(), {"Content-Type": "image/png"})


async def load(port: int, payloads: list[bytes], concurrency: int, requests: int, seconds: float, pid: int) -> dict:
    conns = [await Connection.open(port) for _ in range(concurrency)]
    cpu0 = cpu_seconds(pid)
    latencies: list[float] = []
    errors = 0
    sent = 0
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def worker(conn: Connection, k: int) -> None:
        nonlocal sent, errors
        while sent < requests and time.perf_counter() < stop_at:
            sent += 1
            start = time.perf_counter()
            status, _ = await conn.request(payloads[(sent + k) % len(payloads)])
            latencies.append(time.perf_counter() - start)
            errors += status != 200

    await asyncio.gather(*(worker(c, k) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    for c in conns:
        c.close()
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "errors": errors, "images_per_s": len(latencies) / elapsed,
        "cpu_ms": 1000 * cpu / max(1, len(latencies)),
        "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99)),
    }


# ---- runs ------------------------------------------------------------------------------------
def _row(label: str, mode: str, c: int | str, r: dict) -> str:
    lat = f"{r['p50']:>8.2f} {r['p95']:>8.2f} {r['p99']:>8.2f}" if "p50" in r else f"{'':>8} {'':>8} {'':>8}"
    return (f"{label:<8} {mode:<8} {c:>5} {r.get('requests', ''):>8} {r.get('errors', ''):>6} "
            f"{r['images_per_s']:>9.1f} {lat} {r['cpu_ms']:>12.2f}")


def run_levels(args, name: str, images: np.ndarray, raw_session: RawSession, servers: dict, endpoints: list[str],
               levels: list[int]) -> tuple[dict, dict]:
    """Every (endpoint, concurrency, batching) level, then paired rounds at concurrency 16."""
    builders = {"infer": infer_request, "predict": predict_request}
    results: dict[tuple[str, bool, int], dict] = {}
    paired: dict[str, list[dict]] = {}
    print(f"\n{'':<8} {'batching':<8} {'conc':>5} {'requests':>8} {'errors':>6} {'images/s':>9} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'CPU ms/img':>12}")
    for b in (1, args.max_batch_size):
        print(_row("raw", "session", f"b{b}", raw_session.throughput(b, 2.0)))
    for endpoint in endpoints:
        payloads = [builders[endpoint](name, img) for img in images]
        for port, proc in servers.values():
            asyncio.run(load(port, payloads, 4, 50, 2.0, proc.pid))  # warm the server's code paths
        for c in levels:
            for batching, (port, proc) in servers.items():
                r = results[(endpoint, batching, c)] = asyncio.run(load(port, payloads, c, args.requests, args.seconds, proc.pid))
                print(_row(endpoint, "on" if batching else "off", c, r), flush=True)
        rounds = paired[endpoint] = []
        for _ in range(args.rounds):
            one = {"raw": raw_session.throughput(args.max_batch_size, args.round_seconds)["images_per_s"]}
            for batching, (port, proc) in servers.items():
                one[batching] = asyncio.run(load(port, payloads, 16, 10**9, args.round_seconds, proc.pid))["images_per_s"]
            rounds.append(one)
    for b in (1, args.max_batch_size):
        print(_row("raw", "session", f"b{b}", raw_session.throughput(b, 2.0)))
    return results, paired


def summarize(args, raw_session: RawSession, results: dict, paired: dict, endpoints: list[str]) -> None:
    print(f"\nconcurrency 16, {args.rounds} rounds alternating the raw session (batch {args.max_batch_size}) and the "
          f"service, {args.round_seconds:g} s each; medians:")
    for endpoint in endpoints:
        rounds = paired[endpoint]
        if True in rounds[0]:
            ratio = float(np.median([r[True] / r["raw"] for r in rounds]))
            print(f"  {endpoint}: service with batching = {ratio:.0%} of the raw session (goal >= 80%)")
        if True in rounds[0] and False in rounds[0]:
            speedup = float(np.median([r[True] / r[False] for r in rounds]))
            print(f"  {endpoint}: batching on / off = {speedup:.2f}x (goal >= 3x)")
    raw1, rawb = raw_session.throughput(1, 2.0), raw_session.throughput(args.max_batch_size, 2.0)
    print(f"  raw session batch {args.max_batch_size} / batch 1 = {rawb['images_per_s'] / raw1['images_per_s']:.2f}x "
          f"(CPU ms/img {raw1['cpu_ms']:.2f} -> {rawb['cpu_ms']:.2f}): the most batching can gain on this hardware")
    print("CPU cost per image at concurrency 16 (less sensitive to other load than images/s; the client's CPU is not "
          "counted):")
    for endpoint in endpoints:
        on, off = results.get((endpoint, True, 16)), results.get((endpoint, False, 16))
        if on:
            print(f"  {endpoint}: raw session / service with batching = {rawb['cpu_ms'] / on['cpu_ms']:.0%}"
                  + (f"; batching off / on = {off['cpu_ms'] / on['cpu_ms']:.2f}x" if off else ""))
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ---- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default=None)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests per level")
    parser.add_argument("--seconds", type=float, default=4.0, help="at most this long per level")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    parser.add_argument("--no-spinning", action="store_true", help="service sessions with spinning threads off")
    parser.add_argument("--batching", default="on,off", help="which batching modes to run")
    parser.add_argument("--endpoints", default="infer,predict")
    parser.add_argument("--rounds", type=int, default=3, help="paired service/raw rounds at concurrency 16")
    parser.add_argument("--round-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    tmp = None
    try:
        name, folder, card = find_model(args.model_dir, args.model)
    except FileNotFoundError:
        tmp = tempfile.TemporaryDirectory()
        args.model_dir = Path(tmp.name)
        export_tiny(args.model_dir)
        name, folder, card = find_model(args.model_dir, None)
    shape = (card["input"]["height"], card["input"]["width"], card["input"]["channels"])
    images = np.random.default_rng(0).integers(0, 256, (32, *shape), dtype=np.uint8)
    print(f"model {name}/{folder.name}, input {shape}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.2f}), max batch {args.max_batch_size}, "
          f"delay {args.delay_ms} ms, at most {args.requests} requests or {args.seconds:g} s per level")

    raw_session = RawSession(folder / "model.onnx", images, args.threads)
    modes = [mode == "on" for mode in args.batching.split(",")]
    endpoints = args.endpoints.split(",")
    servers: dict[bool, tuple[int, subprocess.Popen]] = {}
    try:
        # both servers run side by side and are measured alternately, level by level, so that
        # drifts in the background load of a shared machine hit both alike
        for batching in modes:
            port = free_port()
            servers[batching] = (port, start_server(args.model_dir, port, batching, args))
        results, paired = run_levels(args, name, images, raw_session, servers, endpoints, levels)
    finally:
        for _, proc in servers.values():
            stop_server(proc)
    summarize(args, raw_session, results, paired, endpoints)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
