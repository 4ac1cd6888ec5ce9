"""ONNX Runtime (CPU) against PyTorch eager on the same model, same uint8 inputs, same outputs.

    python benchmarks/bench_onnx.py [--model gsa_rotmnist_r4 | --checkpoint ckpt.pt] [--onnx model.onnx]
        [--batches 1 8 64] [--sweep-batch 8] [--min-time 2]

1. Exports the model once (the shipped CPU graph: encodings frozen, a per-image loop with
   cache-sized chunks; ``--batched`` for the batched graph instead), unless ``--onnx`` names an
   exported graph of the same model.
2. Sweeps ONNX Runtime session options at ``--sweep-batch``: intra-op threads 1/2, graph
   optimisation basic/extended/all, sequential or parallel execution (2 inter-op threads; the
   chunks of a layer are independent branches of the graph). Prints the table and the winner.
3. Measures PyTorch eager (on the CPU the fused attention kernel) and ONNX Runtime (the best
   options of the sweep) with 1 and 2 threads at every batch size, and prints the ratios at equal
   thread counts and best against best.

Every measurement runs in a fresh subprocess: throughput over timed runs after one warm-up run, and
peak resident memory above the baseline after loading (the kernel's peak counter is reset once the
model or session is loaded, so the number is what inference itself adds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from procmem import peak_mb, reset_peak, rss_mb  # benchmarks/procmem.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
OPT_LEVELS = ("basic", "extended", "all")


# ---- workers (one per subprocess) --------------------------------------------------------------
def _images(args) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (args.batch, args.size, args.size, args.chans), dtype=np.uint8)


def _time(run, images: np.ndarray, warm: np.ndarray, min_time: float) -> tuple[float, int]:
    run(warm)  # fills caches and allocators (a small batch: eager at batch 64 is slow)
    runs, start = 0, time.perf_counter()
    while True:
        run(images)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or runs >= 50:
            return elapsed / runs, runs


def _load_model(args):
    import torch

    from training.networks import create_model

    if args.checkpoint:
        from training.checkpoint import load_model

        model, _ = load_model(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        model = create_model(args.model)
    return model.eval()


def worker_torch(args) -> dict:
    import torch

    from training.export_graph import ExportWrapper

    torch.set_num_threads(args.threads)
    model = _load_model(args)
    wrapper = ExportWrapper(model).eval()
    images = _images(args)
    with torch.inference_mode():
        def run(x):
            return wrapper(torch.from_numpy(x))
        base = rss_mb()
        exact = reset_peak()
        sec, runs = _time(run, images, images[: min(len(images), 8)], args.min_time)
    return {"seconds": sec, "runs": runs, "peak_mb": peak_mb() - base, "exact_peak": exact}


def worker_ort(args) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[args.opt]
    if args.parallel:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        opts.inter_op_num_threads = 2
    else:
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    images = _images(args)

    def run(x):
        return session.run(None, {"image": x})
    base = rss_mb()
    exact = reset_peak()
    sec, runs = _time(run, images, images[: min(len(images), 8)], args.min_time)
    return {"seconds": sec, "runs": runs, "peak_mb": peak_mb() - base, "exact_peak": exact}


# ---- driver ------------------------------------------------------------------------------------
def _spawn(common: list[str], extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *common, *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(r: dict, batch: int) -> str:
    if "error" in r:
        return f"{'error: ' + r['error'][:40]:>28}"
    return f"{batch / r['seconds']:9.1f} img/s {r['peak_mb']:8.0f} MB"


def _config_name(c: dict) -> str:
    return f"intra={c['threads']} opt={c['opt']:<8} {'parallel' if c['parallel'] else 'sequential'}"


def driver(args) -> None:
    import torch

    from training.export_graph import build_graph

    model = _load_model(args)
    cfg = model.config
    size, chans = cfg.img_size, cfg.in_chans
    source = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights (seed {args.seed})"
    tmp = tempfile.TemporaryDirectory()
    onnx_path = args.onnx
    if onnx_path is None:
        t = time.perf_counter()
        result = build_graph(model, per_image=not args.batched)
        onnx_path = str(Path(tmp.name) / "model.onnx")
        Path(onnx_path).write_bytes(result.model.SerializeToString())
        layout = "per-image Scan" if result.per_image else "batched"
        print(f"exported {model.name} in {time.perf_counter() - t:.0f} s ({result.exporter}, {layout}, "
              f"chunk_queries {result.chunk_queries})", flush=True)
    common = ["--size", str(size), "--chans", str(chans), "--min-time", str(args.min_time), "--seed", str(args.seed)]
    common += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]
    print(f"model {model.name} ({source}), input {size}x{size}x{chans}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)

    # 1. session option sweep
    configs = [{"threads": t, "opt": o, "parallel": p} for t in (1, 2) for o in OPT_LEVELS for p in (False, True)]
    print(f"\nONNX Runtime session options at batch {args.sweep_batch}:")
    sweep = []
    for c in configs:
        r = _spawn(common, _ort_args(onnx_path, args.sweep_batch, c, min_time=args.sweep_time), args.timeout)
        sweep.append((c, r))
        print(f"  {_config_name(c)}  {_fmt(r, args.sweep_batch)}", flush=True)
    best = {}
    for threads in (1, 2):
        ok = [(c, r) for c, r in sweep if "error" not in r and c["threads"] == threads]
        best[threads] = min(ok, key=lambda cr: cr[1]["seconds"])[0]
    winner = min(((c, r) for c, r in sweep if "error" not in r), key=lambda cr: cr[1]["seconds"])[0]
    print(f"  winner: {_config_name(winner)}")

    # 2. batches: eager and the best ORT options at 1 and 2 threads. A 2-thread run is skipped once
    # it was more than twice as slow as 1 thread at a smaller batch (an oversubscribed machine).
    rows, skip = [], set()
    for batch in args.batches:
        row = {"batch": batch}
        for threads in (1, 2):
            for engine in ("torch", "ort"):
                key = f"{engine}{threads}"
                if key in skip:
                    row[key] = {"error": "skipped (2 threads slower)"}
                    continue
                extra = (["--engine", "torch", "--batch", str(batch), "--threads", str(threads)] if engine == "torch"
                         else _ort_args(onnx_path, batch, best[threads]))
                row[key] = _spawn(common, extra, args.timeout)
        for engine in ("torch", "ort"):
            one, two = row[f"{engine}1"], row[f"{engine}2"]
            if "error" not in one and ("error" in two or two["seconds"] > 2 * one["seconds"]):
                skip.add(f"{engine}2")
        rows.append(row)
        print(f"  batch {batch} done (load average {os.getloadavg()[0]:.1f})", flush=True)

    print(f"\nthroughput and peak RSS above the post-load baseline (fresh process each; >= {args.min_time:g} s of timed runs)")
    print(f"ORT options: 1 thread {_config_name(best[1])}; 2 threads {_config_name(best[2])}")
    cols = ("torch1", "ort1", "torch2", "ort2")
    names = ("torch eager, 1 thread", "ORT, 1 thread", "torch eager, 2 threads", "ORT, 2 threads")
    header = f"{'batch':>5} | " + " | ".join(f"{n:>26}" for n in names) + " | ORT/eager (1 thr, 2 thr, best/best)"
    print(header)
    print("-" * len(header))
    for row in rows:
        b = row["batch"]
        ratios = []
        for t in ("1", "2"):
            e, o = row["torch" + t], row["ort" + t]
            ratios.append(f"{e['seconds'] / o['seconds']:.2f}x" if "error" not in e and "error" not in o else "-")
        fastest = {e: min((row[e + t]["seconds"] for t in "12" if "error" not in row[e + t]), default=None) for e in ("torch", "ort")}
        ratios.append(f"{fastest['torch'] / fastest['ort']:.2f}x" if None not in fastest.values() else "-")
        print(f"{b:>5} | " + " | ".join(f"{_fmt(row[c], b):>26}" for c in cols) + " | " + ", ".join(ratios))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    tmp.cleanup()


def _ort_args(onnx_path: str, batch: int, c: dict, min_time: float | None = None) -> list[str]:
    out = ["--engine", "ort", "--onnx", onnx_path, "--batch", str(batch), "--threads", str(c["threads"]), "--opt", c["opt"]]
    out += ["--parallel"] if c["parallel"] else []
    return out + (["--min-time", str(min_time)] if min_time is not None else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gsa_rotmnist_r4", help="registered model (random weights)")
    p.add_argument("--checkpoint", default=None, help="use a checkpoint's model and weights instead")
    p.add_argument("--onnx", default=None, help="an exported graph of the same model (skips the export)")
    p.add_argument("--batched", action="store_true", help="benchmark the batched graph instead of the per-image loop")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--sweep-batch", type=int, default=8)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed runs per measurement (at least one run)")
    p.add_argument("--sweep-time", type=float, default=1.0, help="seconds of timed runs per option in the sweep")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per measurement process")
    p.add_argument("--seed", type=int, default=0)
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=("torch", "ort"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--opt", choices=OPT_LEVELS, default="all", help=argparse.SUPPRESS)
    p.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--chans", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if str(ROOT) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(ROOT))
    if args.worker:
        result = worker_torch(args) if args.engine == "torch" else worker_ort(args)
        print(json.dumps(result))
        return
    driver(args)


if __name__ == "__main__":
    main()
