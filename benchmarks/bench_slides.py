"""Slide scoring against raw model throughput, and peak memory for two slide sizes.

    python benchmarks/bench_slides.py [--sizes 8192 16384] [--img-size 16] [--batch-size 32]
        [--threads 1] [--readers 1] [--model-dir DIR --model NAME]

1. Writes two synthetic pyramidal tiled TIFFs (0.5 um/px, zlib-compressed 256-pixel tiles, levels 1, 1/2, 1/4; square,
   ``--sizes`` pixels a side at level 0, about half of it "tissue"), tile by tile, so that the
   writer never holds a level in memory either.
2. Exports a small random-weight R4 GSA-Net (RGB, ``--img-size`` pixels, 1 um/px: tiles come from
   level 1 without resampling) unless ``--model`` names one in ``--model-dir``.
3. For each slide, in a fresh subprocess: the raw ONNX Runtime session on ready-made tiles at the
   same batch size and threads (images/s, measured before and after the slide and averaged, as the
   load of a shared machine drifts), then the whole slide through the engine
   (service.scoring.score_slide: tissue mask, streamed tiles, reader threads, result files),
   tiles/s over the scoring phase and over the whole run, and the peak memory: the process's
   peak resident set above its level after the model was loaded, and tracemalloc's peak of
   Python-visible allocations (numpy buffers included). Also printed: the fraction of the scoring
   phase the model was busy (time in session.run over wall time), a ratio immune to load drift.

Goals: slide scoring at >= 80% of raw model throughput; peak memory flat in the slide size.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from procmem import peak_mb, reset_peak, rss_mb  # benchmarks/procmem.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLIDE_MPP = 0.5
MODEL_MPP = 1.0


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


# ---- one measurement, in a fresh process ---------------------------------------------------------


def measure(args: dict) -> dict:
    from service.score import load_model
    from service.scoring.slide_scoring import SlideOptions, score_slide

    model = load_model(Path(args["model_dir"]), args["model"], None, threads=args["threads"])
    card, bs = model.card, args["batch_size"]
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (bs, card.height, card.width, 3), dtype=np.uint8)
    model.run(batch)

    def raw_rate() -> float:
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args["raw_seconds"]:
            model.run(batch)
            runs += 1
        return runs * bs / (time.perf_counter() - t0)

    raw_before = raw_rate()

    base = rss_mb()
    exact = reset_peak()
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as out:
        meta = score_slide(model, args["slide"], out, SlideOptions(batch_size=bs, readers=args["readers"]))
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    raw_after = raw_rate()  # the machine's load drifts: raw throughput before and after, averaged
    scoring = meta["timing"]["scoring"]
    return {
        "raw_images_per_s": (raw_before + raw_after) / 2, "raw_before": raw_before, "raw_after": raw_after,
        "model_busy": scoring["model_s"] / scoring["wall_s"], "tiles": meta["counts"]["scored_tiles"], "grid": meta["counts"]["grid_tiles"],
        "scoring_tiles_per_s": scoring["images_per_s"], "reader_wait_s": scoring["reader_wait_s"],
        "total_s": meta["timing"]["total_s"], "tissue_s": meta["timing"]["tissue_s"],
        "end_to_end_tiles_per_s": meta["counts"]["scored_tiles"] / meta["timing"]["total_s"],
        "peak_rss_above_loaded_mb": peak_mb() - base if exact else None, "peak_rss_mb": peak_mb(),
        "tracemalloc_peak_mb": traced_peak, "level": meta["plan"]["level"], "resampled": meta["plan"]["resampled"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[8192, 16384], help="level-0 side of the two slides")
    p.add_argument("--img-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--raw-seconds", type=float, default=5.0)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_slides_") as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir, model = args.model_dir or ROOT / "models", args.model
        else:
            model_dir, model = export_model(tmp / "models", args.img_size)
        ctx = mp.get_context("spawn")  # a fresh interpreter per slide: no torch, its own peak memory
        print(f"model {model} ({args.img_size}x{args.img_size} RGB), batch {args.batch_size}, "
              f"{args.threads} ORT thread(s), {args.readers} reader thread(s)")
        results = []
        for side in args.sizes:
            t = time.perf_counter()
            slide = write_slide(tmp / f"slide_{side}.tiff", side)
            print(f"wrote {side}x{side} slide ({slide.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
            with ctx.Pool(1) as pool:
                r = pool.apply(measure, ({"model_dir": str(model_dir), "model": model, "slide": str(slide),
                                          "batch_size": args.batch_size, "threads": args.threads,
                                          "readers": args.readers, "raw_seconds": args.raw_seconds},))
            r["side"] = side
            results.append(r)
            ratio = r["scoring_tiles_per_s"] / r["raw_images_per_s"]
            print(f"  {side:>6} px  {r['tiles']:>6} of {r['grid']:>6} tiles  raw model {r['raw_images_per_s']:7.1f} img/s"
                  f"  slide scoring {r['scoring_tiles_per_s']:7.1f} tiles/s ({ratio:5.1%} of raw; "
                  f"{r['end_to_end_tiles_per_s']:.1f}/s end to end incl. tissue mask {r['tissue_s']:.1f} s and writing)"
                  f"  peak RSS +{r['peak_rss_above_loaded_mb'] or float('nan'):.0f} MB (total {r['peak_rss_mb']:.0f} MB),"
                  f" tracemalloc peak {r['tracemalloc_peak_mb']:.1f} MB; raw before/after {r['raw_before']:.0f}/"
                  f"{r['raw_after']:.0f} img/s, the model was busy {r['model_busy']:.1%} of the scoring phase", flush=True)
        small, large = results
        print(json.dumps({"results": results,
                          "memory_growth_ratio_rss": (large["peak_rss_above_loaded_mb"] or 0) /
                          max(small["peak_rss_above_loaded_mb"] or 1, 1),
                          "area_ratio": (large["side"] / small["side"]) ** 2}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
