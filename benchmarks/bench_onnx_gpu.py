"""The committed graphs on a GPU: ONNX Runtime's CUDA execution provider (fp32 graph with and
without TF32, fp16 graph) against PyTorch eager on the same GPU and ONNX Runtime on the CPU.

    python benchmarks/bench_onnx_gpu.py [--models models/rotmnist-r4/3 ...] [--batches 1 8 64 256]
        [--min-time 1] [--mnist PATH] [--output report.json]

Needs onnxruntime-gpu and a CUDA device. For each model version it prints:

1. accuracy on the 1,000 validation digits and the largest logit difference from the checkpoint
   run by PyTorch (fp32, CPU) for every ONNX Runtime configuration;
2. the equivariance error (relative, logits and orientation responses) under the grid-exact
   elements of the group;
3. images/s at each batch size (uint8 images in, every contract output back on the host, as the
   service runs them).

GPU memory is not reported: device free memory around a session also moves with the arenas of
the sessions before it (a first version printed negative figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import onnxruntime as ort  # after torch: the CUDA libraries PyTorch loaded serve onnxruntime-gpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoint import load_model  # noqa: E402
from training.data import build_dataset  # noqa: E402
from training.equivariance import act_on_group_signal, act_on_spatial, relative_error  # noqa: E402

CUDA = "CUDAExecutionProvider"
NAMES = ["logits", "probabilities", "orientation_responses"]


def configs(version: Path) -> dict[str, tuple[Path, list]]:
    out = {
        "ort-cuda-fp32": (version / "model.onnx", [(CUDA, {"use_tf32": "0"}), "CPUExecutionProvider"]),
        "ort-cuda-fp32-tf32": (version / "model.onnx", [(CUDA, {"use_tf32": "1"}), "CPUExecutionProvider"]),
        "ort-cpu-fp32": (version / "model.onnx", ["CPUExecutionProvider"]),
    }
    if (version / "model.fp16.onnx").is_file():
        out["ort-cuda-fp16"] = (version / "model.fp16.onnx", [CUDA, "CPUExecutionProvider"])
    return out


def throughput(run, batch: int, size: int, min_time: float) -> float:
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 1), dtype=np.uint8)
    run(images)  # warm-up: allocations, cuDNN/cuBLAS algorithm choice
    runs, start = 0, time.perf_counter()
    while True:
        run(images)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and runs >= 3:
            return batch * runs / elapsed


def equivariance_error(run, pixels: torch.Tensor, group) -> float:
    base = run(pixels.permute(0, 2, 3, 1).contiguous().numpy())
    worst = 0.0
    for e in range(1, group.order):
        if not group.is_grid_exact(e):
            continue
        out = run(act_on_spatial(pixels, group, e, (2, 3)).permute(0, 2, 3, 1).contiguous().numpy())
        expected = act_on_group_signal(torch.from_numpy(base["orientation_responses"]), group, e, None, 2)
        worst = max(worst, relative_error(torch.from_numpy(out["logits"]), torch.from_numpy(base["logits"])),
                    relative_error(torch.from_numpy(out["orientation_responses"]), expected))
    return worst


def bench_version(version: Path, pixels: torch.Tensor, labels: torch.Tensor, args) -> dict:
    model, _ = load_model(version / "checkpoint_best.pt", map_location="cpu")
    model.eval()
    with torch.no_grad():
        ref = model.forward_all(pixels.float() / 255)["logits"].numpy()
    size = pixels.shape[-1]
    image = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    report = {"version": str(version.relative_to(ROOT)), "configs": {}}

    # PyTorch eager on the GPU, fp32 without TF32 (the same numbers as the CPU up to rounding).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu_model = model.to("cuda")

    def eager(batch: np.ndarray) -> dict:
        with torch.no_grad():
            x = torch.from_numpy(batch).to("cuda").permute(0, 3, 1, 2).float() / 255
            return {k: v.cpu().numpy() for k, v in gpu_model.forward_all(x).items()}

    logits = np.concatenate([eager(image[i:i + 250])["logits"] for i in range(0, len(image), 250)])
    report["configs"]["torch-cuda-fp32"] = {
        "accuracy": float((logits.argmax(1) == labels.numpy()).mean()),
        "max_abs_logit_diff": float(np.abs(logits - ref).max()),
        "equivariance_error": equivariance_error(eager, pixels[:32], model.group),
        "images_per_s": {b: throughput(eager, b, size, args.min_time) for b in args.batches},
    }
    del gpu_model
    torch.cuda.empty_cache()

    for name, (graph, providers) in configs(version).items():
        session = ort.InferenceSession(str(graph), providers=providers)

        def run(batch: np.ndarray, session=session) -> dict:
            return dict(zip(NAMES, session.run(NAMES, {"image": batch})))

        logits = np.concatenate([run(image[i:i + 250])["logits"] for i in range(0, len(image), 250)])
        row = {
            "providers": session.get_providers(),
            "accuracy": float((logits.argmax(1) == labels.numpy()).mean()),
            "max_abs_logit_diff": float(np.abs(logits - ref).max()),
            "equivariance_error": equivariance_error(run, pixels[:32], model.group),
            "images_per_s": {b: throughput(run, b, size, args.min_time) for b in args.batches},
        }
        report["configs"][name] = row
        del session
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=Path,
                        default=sorted(p.parent for p in (ROOT / "models").glob("*/*/model.onnx")))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist" / "mnist-train-10k.npz")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if CUDA not in ort.get_available_providers() or not torch.cuda.is_available():
        sys.exit(f"needs onnxruntime-gpu and a CUDA device; providers: {ort.get_available_providers()}")
    options = {"val_size": 1000, "split_seed": 0, "rotate": True, "rotation_seed": 0}
    val = build_dataset("mnist", args.mnist, "val", **options)
    pixels = (torch.stack([val[i][0] for i in range(len(val))]) * 255).round().to(torch.uint8)
    labels = torch.tensor([int(val[i][1]) for i in range(len(val))])
    print(f"{torch.cuda.get_device_name()}, onnxruntime {ort.__version__}, torch {torch.__version__}")
    reports = []
    for version in args.models:
        report = bench_version(version.resolve(), pixels, labels, args)
        reports.append(report)
        if args.output:
            args.output.write_text(json.dumps(reports, indent=2))
        print(f"\n{report['version']}")
        head = f"{'config':20s} {'acc':>6s} {'logit diff':>10s} {'equiv err':>9s} " + " ".join(
            f"{'b' + str(b) + ' img/s':>11s}" for b in args.batches)
        print(head)
        for name, row in report["configs"].items():
            print(f"{name:20s} {row['accuracy']:6.3f} {row['max_abs_logit_diff']:10.2e} {row['equivariance_error']:9.1e} "
                  + " ".join(f"{row['images_per_s'][b]:11.0f}" for b in args.batches))


if __name__ == "__main__":
    main()
