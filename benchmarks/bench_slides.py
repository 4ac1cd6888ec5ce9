"""Slide scoring against raw model throughput (ONNX Runtime, and PyTorch with the fused CPU kernel),
in tiles/s and per mm2 of tissue, and peak memory for two slide sizes.

    python benchmarks/bench_slides.py [--sizes 8192 16384] [--img-size 16] [--batch-size 32]
        [--threads 1] [--readers 1] [--raw-seconds 5]
        [--model-dir DIR --model NAME [--checkpoint CKPT]] [--slide PATH ...]

1. Writes two synthetic pyramidal tiled TIFFs (0.5 um/px, zlib-compressed 256-pixel tiles, levels 1, 1/2, 1/4; square,
   ``--sizes`` pixels a side at level 0, about half of it "tissue"), tile by tile, so that the
   writer never holds a level in memory either; ``--slide`` (repeatable) scores real slides instead.
2. Exports a small random-weight R4 GSA-Net (RGB, ``--img-size`` pixels, 1 um/px: tiles come from
   level 1 without resampling) unless ``--model`` names one in ``--model-dir`` (the newest version).
3. For each slide, in a fresh subprocess: the raw ONNX Runtime session on ready-made tiles at the
   same batch size and threads (images/s, measured before and after the slide and averaged, as the
   load of a shared machine drifts), then the whole slide through the engine
   (service.scoring.score_slide: tissue mask, streamed tiles, reader threads, result files),
   tiles/s over the scoring phase and over the whole run, and the peak memory: the process's
   peak resident set above its level after the model was loaded, and tracemalloc's peak of
   Python-visible allocations (numpy buffers included). Also printed: the fraction of the scoring
   phase the model was busy (time in session.run over wall time), a ratio immune to load drift.
4. With ``--checkpoint`` (a trainer checkpoint of the model ``--model`` names), once, in its own
   spawned process so that torch never enters the ONNX Runtime ones: PyTorch eager on the CPU at the
   same batch size and thread count (``torch.set_num_threads``), through the exported graph's own
   wrapper (:class:`training.export_graph.ExportWrapper`: the same uint8 NHWC tiles in, ``x / 255``
   to float NCHW, then the model's normalisation), images/s over ``--raw-seconds``; with
   ``GSA_FUSED_ATTENTION=1`` (the fused kernel must build). A first forward on two tiles counts the
   fused kernel's calls against the model's attention layers (a mismatch is an error) and compares
   its logits with the ONNX graph's on the same tiles. Printed beside the raw ONNX Runtime and
   slide-scoring rates, with the ratios.
5. Per mm2 of tissue: at the default stride (the tile size) a tile covers ``(tile_px * mpp / 1000)^2``
   mm2 (the card's input size and ``mpp``), so each rate becomes seconds per mm2 and per cm2 of
   tissue; also printed, the tissue area the run scored (scored tiles / tiles per mm2).

Goals: slide scoring at >= 80% of raw model throughput; peak memory flat in the slide size (printed
for the two synthetic slides only).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from procmem import peak_mb, reset_peak, rss_mb  # benchmarks/procmem.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLIDE_MPP = 0.5
MODEL_MPP = 1.0
PARITY_TILES = 2  # tiles of the checked first PyTorch forward (logits compared with the ONNX graph's)


# ---- synthetic slides ----------------------------------------------------------------------------
def _tile_pixels(x0: int, y0: int, size: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """One tile of a level ``scale`` times coarser than level 0: pink 'tissue' where a smooth field is
    positive (about half the slide), pale glass elsewhere, with pixel noise."""
    ys, xs = np.mgrid[0:size, 0:size]
    gx, gy = (x0 + xs) * scale, (y0 + ys) * scale
    field = np.sin(gx / 700.0) * np.cos(gy / 900.0) + 0.5 * np.sin((gx + gy) / 1300.0)
    tissue = field > 0.1
    noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    glass = np.full((size, size, 3), 235, np.uint8) + noise // 4
    pink = np.stack([190 + noise[..., 0] // 2, 80 + noise[..., 1], 150 + noise[..., 2]], -1).astype(np.uint8)
    return np.where(tissue[..., None], pink, glass)


def write_slide(path: Path, side: int, levels: int = 3, tile: int = 256) -> Path:
    import tifffile

    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lv in range(levels):
            scale = 2 ** lv
            n = math.ceil(side / scale)

            def tiles():
                for ty in range(0, n, tile):
                    for tx in range(0, n, tile):
                        yield _tile_pixels(tx, ty, tile, scale, rng)

            ppcm = 1e4 / (SLIDE_MPP * scale)
            tw.write(tiles(), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="zlib", compressionargs={"level": 1}, resolution=(ppcm, ppcm), resolutionunit="CENTIMETER",
                     subfiletype=1 if lv else 0)
    return path


def export_model(root: Path, img_size: int) -> tuple[Path, str]:
    import torch

    from training.export import export_model as export
    from training.networks import GSANetConfig, model_from_config

    torch.manual_seed(0)
    cfg = GSANetConfig(group="R4", in_chans=3, num_classes=2, img_size=img_size, dim=8, num_heads=2,
                       block_sizes=(1, 1), expansion=(1, 1), crops=(1, 1), mean=(0.70, 0.54, 0.69),
                       std=(0.23, 0.28, 0.21), class_names=("normal", "tumor"))
    net = model_from_config("bench_path_r4", cfg).eval()
    with torch.no_grad():  # random weights: keep the summed readout's logits moderate (and export parity tight)
        net.head.weight.mul_(0.02)
    export(net, root, "bench_path_r4", "1", mpp=MODEL_MPP,
           command="benchmarks/bench_slides.py")
    return root, "bench_path_r4"


# ---- measurements, each in a fresh process -------------------------------------------------------


def measure(args: dict) -> dict:
    """Raw ONNX Runtime throughput before and after scoring one slide, the slide's rates and peak memory."""
    from service.score import load_model
    from service.scoring.slide_scoring import SlideOptions, score_slide

    model = load_model(Path(args["model_dir"]), args["model"], None, threads=args["threads"])
    card, bs = model.card, args["batch_size"]
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (bs, card.height, card.width, 3), dtype=np.uint8)
    model.run(batch)
    raw_before = _rate(lambda: model.run(batch), bs, args["raw_seconds"])

    base = rss_mb()
    exact = reset_peak()
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as out:
        meta = score_slide(model, args["slide"], out, SlideOptions(batch_size=bs, readers=args["readers"]))
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    raw_after = _rate(lambda: model.run(batch), bs, args["raw_seconds"])  # the load drifts: before and after, averaged
    scoring = meta["timing"]["scoring"]
    return {
        "raw_images_per_s": (raw_before + raw_after) / 2, "raw_before": raw_before, "raw_after": raw_after,
        "model_busy": scoring["model_s"] / scoring["wall_s"], "tiles": meta["counts"]["scored_tiles"], "grid": meta["counts"]["grid_tiles"],
        "scoring_tiles_per_s": scoring["images_per_s"], "reader_wait_s": scoring["reader_wait_s"],
        "total_s": meta["timing"]["total_s"], "tissue_s": meta["timing"]["tissue_s"],
        "end_to_end_tiles_per_s": meta["counts"]["scored_tiles"] / meta["timing"]["total_s"],
        "peak_rss_above_loaded_mb": peak_mb() - base if exact else None, "peak_rss_mb": peak_mb(),
        "tracemalloc_peak_mb": traced_peak, "level": meta["plan"]["level"], "resampled": meta["plan"]["resampled"],
        "dimensions": meta["slide"]["dimensions"], "slide_mpp": meta["slide"]["mpp"],
    }


def _rate(run: Callable[[], Any], batch_size: int, seconds: float) -> float:
    """Images/s of ``run`` (one batch per call) over at least ``seconds`` (at least one call)."""
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        runs += 1
    return runs * batch_size / (time.perf_counter() - t0)


def _counting_fused_calls(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and how many times it called the fused CPU attention kernel."""
    from training import fused_attention

    real, calls = fused_attention.forward, [0]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    fused_attention.forward = counted  # attention_kernels looks it up on the module at each call
    try:
        return run(), calls[0]
    finally:
        fused_attention.forward = real


def measure_torch(args: dict) -> dict:
    """PyTorch eager on the CPU with the fused attention kernel, as the exported graph computes: images/s."""
    os.environ["GSA_FUSED_ATTENTION"] = "1"  # must build: no silent fallback to the chunked kernel
    import torch

    from service.score import load_model as load_onnx
    from training.attention_base import WindowedAttention
    from training.checkpoint import load_model
    from training.export_graph import ExportWrapper

    torch.set_num_threads(args["threads"])
    net, ckpt = load_model(args["checkpoint"])
    if ckpt["model_name"] != args["card_model"]:
        raise ValueError(f"{args['checkpoint']} holds {ckpt['model_name']!r}; the exported model is {args['card_model']!r}")
    wrapper = ExportWrapper(net.eval()).eval()  # uint8 NHWC in; x / 255 to float NCHW, then the model's normalisation
    bs, size = args["batch_size"], args["size"]
    batch = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
    check = np.random.default_rng(1).integers(0, 256, (PARITY_TILES, size, size, 3), dtype=np.uint8)
    layers = sum(isinstance(m, WindowedAttention) for m in net.modules())
    with torch.inference_mode():
        logits, calls = _counting_fused_calls(lambda: wrapper(torch.from_numpy(check))[0].numpy())
        if calls != layers:
            raise RuntimeError(f"the fused kernel ran {calls} times in a forward of {layers} attention layers")
        wrapper(torch.from_numpy(batch))  # warm-up at the measured batch size
        rate = _rate(lambda: wrapper(torch.from_numpy(batch)), bs, args["raw_seconds"])
    onnx = load_onnx(Path(args["model_dir"]), args["model"], None, threads=args["threads"])
    diff = float(np.abs(onnx.run(check)["logits"] - logits).max())
    return {"images_per_s": rate, "fused_calls_per_forward": calls, "attention_layers": layers,
            "max_abs_logit_diff_vs_onnx": diff, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


# ---- figures per area of tissue -------------------------------------------------------------------


def tiles_per_mm2(tile_px: int, mpp: float) -> float:
    """Tiles of ``tile_px`` pixels at ``mpp`` um/px in one mm2, at the default stride (the tile size)."""
    return 1.0 / (tile_px * mpp / 1000.0) ** 2


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def per_area(rate: float, per_mm2: float) -> dict:
    """Seconds per mm2 and per cm2 of tissue at ``rate`` tiles/s."""
    s_mm2 = per_mm2 / rate
    return {"s_per_mm2": s_mm2, "s_per_cm2": 100 * s_mm2}


def _area_text(rate: float, per_mm2: float) -> str:
    a = per_area(rate, per_mm2)
    return f"{a['s_per_mm2']:.3g} s/mm2, {a['s_per_cm2']:.4g} s/cm2 ({_duration(a['s_per_cm2'])})"


# ---- driver --------------------------------------------------------------------------------------


def _in_fresh_process(ctx, fn: Callable[[dict], dict], args: dict) -> dict:
    with ctx.Pool(1) as pool:
        return pool.apply(fn, (args,))


def _slides(args, tmp: Path):
    """``(label, path, synthetic side or None)`` per slide; synthetic ones are written when reached."""
    if args.slide:
        for path in args.slide:
            yield path.name, path, None
        return
    for side in args.sizes:
        t = time.perf_counter()
        slide = write_slide(tmp / f"slide_{side}.tiff", side)
        print(f"wrote {side}x{side} slide ({slide.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t:.0f} s",
              flush=True)
        yield "synthetic", slide, side


def _print_slide(label: str, r: dict, per_mm2: float, torch_rate: float | None) -> None:
    ratio = r["scoring_tiles_per_s"] / r["raw_images_per_s"]
    w, h = r["dimensions"]
    print(f"  {label} ({w}x{h} px at {r['slide_mpp']:.3f} um/px)  {r['tiles']:>6} of {r['grid']:>6} tiles"
          f"  raw model {r['raw_images_per_s']:7.1f} img/s"
          f"  slide scoring {r['scoring_tiles_per_s']:7.1f} tiles/s ({ratio:5.1%} of raw; "
          f"{r['end_to_end_tiles_per_s']:.1f}/s end to end incl. tissue mask {r['tissue_s']:.1f} s and writing)"
          f"  peak RSS +{r['peak_rss_above_loaded_mb'] or float('nan'):.0f} MB (total {r['peak_rss_mb']:.0f} MB),"
          f" tracemalloc peak {r['tracemalloc_peak_mb']:.1f} MB; raw before/after {r['raw_before']:.0f}/"
          f"{r['raw_after']:.0f} img/s, the model was busy {r['model_busy']:.1%} of the scoring phase", flush=True)
    print(f"    tissue scored {r['tiles'] / per_mm2:.3g} mm2; per area of tissue: slide scoring "
          f"{_area_text(r['scoring_tiles_per_s'], per_mm2)}; raw ORT {_area_text(r['raw_images_per_s'], per_mm2)}"
          + (f"; PyTorch {_area_text(torch_rate, per_mm2)}" if torch_rate else ""), flush=True)
    if torch_rate:
        print(f"    ratios: raw ORT / PyTorch {r['raw_images_per_s'] / torch_rate:.2f}x, slide scoring / PyTorch "
              f"{r['scoring_tiles_per_s'] / torch_rate:.2f}x, slide scoring / raw ORT {ratio:.2f}x", flush=True)


def _torch_figures(ctx, common: dict, checkpoint: Path, card) -> dict:
    """PyTorch eager (fused CPU kernel) on ``checkpoint``, in a fresh process; printed and returned."""
    r = _in_fresh_process(ctx, measure_torch, {**common, "checkpoint": str(checkpoint),
                                               "card_model": card.architecture.get("model"), "size": card.width})
    print(f"PyTorch eager {r['torch']} ({checkpoint.name}, fused CPU kernel in {r['fused_calls_per_forward']} of "
          f"{r['attention_layers']} attention layers, {r['torch_threads']} thread(s)): {r['images_per_s']:.1f} img/s "
          f"at batch {common['batch_size']}; logits vs the ONNX graph max abs diff "
          f"{r['max_abs_logit_diff_vs_onnx']:.2e}", flush=True)
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[8192, 16384], help="level-0 side of the two synthetic slides")
    p.add_argument("--slide", type=Path, action="append", default=[],
                   help="a real slide to score instead of the synthetic ones (repeatable)")
    p.add_argument("--img-size", type=int, default=16, help="input size of the random-weight model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, and torch's")
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--raw-seconds", type=float, default=5.0, help="seconds of each raw ORT (and PyTorch) measurement")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--model", default=None, help="an exported model in --model-dir (its newest version)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trainer checkpoint of --model: also measure PyTorch eager with the fused CPU kernel")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.checkpoint and not args.model:
        p.error("--checkpoint needs --model, its export (python -m training.export --checkpoint ...)")
    from service.score import find_version

    with tempfile.TemporaryDirectory(prefix="bench_slides_") as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir, model = args.model_dir or ROOT / "models", args.model
        else:
            model_dir, model = export_model(tmp / "models", args.img_size)
        card = find_version(model_dir, model, None).card
        if card.mpp is None:
            p.error(f"model {model} has no mpp on its card: slides cannot be tiled at its scale")
        per_mm2 = tiles_per_mm2(card.width, card.mpp)
        ctx = mp.get_context("spawn")  # a fresh interpreter per measurement: its own peak memory, torch only where measured
        common = {"model_dir": str(model_dir), "model": model, "batch_size": args.batch_size, "threads": args.threads,
                  "raw_seconds": args.raw_seconds}
        print(f"model {model}/{card.version} ({card.width}x{card.height} RGB at {card.mpp} um/px: {per_mm2:.1f} tiles "
              f"per mm2 of tissue at stride {card.width}), batch {args.batch_size}, {args.threads} ORT/torch thread(s), "
              f"{args.readers} reader thread(s)", flush=True)
        torch_r = _torch_figures(ctx, common, args.checkpoint, card) if args.checkpoint else None
        results = []
        for label, slide, side in _slides(args, tmp):
            r = _in_fresh_process(ctx, measure, {**common, "slide": str(slide), "readers": args.readers})
            r.update(slide=str(slide), side=side, per_area_scoring=per_area(r["scoring_tiles_per_s"], per_mm2),
                     per_area_raw=per_area(r["raw_images_per_s"], per_mm2), tissue_mm2=r["tiles"] / per_mm2)
            results.append(r)
            _print_slide(label, r, per_mm2, torch_r["images_per_s"] if torch_r else None)
        report: dict[str, Any] = {"results": results, "tiles_per_mm2": per_mm2}
        if torch_r:
            report["torch"] = {**torch_r, "per_area": per_area(torch_r["images_per_s"], per_mm2)}
        if not args.slide:
            small, large = results
            report["memory_growth_ratio_rss"] = ((large["peak_rss_above_loaded_mb"] or 0) /
                                                 max(small["peak_rss_above_loaded_mb"] or 1, 1))
            report["area_ratio"] = (large["side"] / small["side"]) ** 2
            print(f"peak RSS above the loaded model: {report['memory_growth_ratio_rss']:.2f}x for "
                  f"{report['area_ratio']:.0f}x the slide area", flush=True)
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
