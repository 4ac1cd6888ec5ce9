"""What scoring a slide archive on a cluster would take, from per-tile costs measured here.

Measures, on this machine, one thread each:

1. reading: every tile of a real slide read the way the slide scorer reads it (OpenSlide, the level
   the plan picks, resampled to the model's resolution), tiles/s;
2. the model: ONNX Runtime on the given graph at batch ``--batch``, 1 thread, tiles/s;
3. a reference graph (``--reference``, default the RotMNIST R4 graph whose GPU throughput was
   measured on an H200) on the same CPU, so that a GPU figure for the pathology graph can be
   extrapolated from the reference's measured GPU/CPU ratio when no GPU is at hand (printed as
   an extrapolation; ``--gpu-tiles-per-s`` replaces it with a measured figure).

Then prints, for ``--slides`` slides of ``--tissue-mm2`` of tissue on ``--nodes`` nodes of
``--cores`` cores (and ``--gpus`` GPUs each for the GPU case): tiles, core-hours, wall time, and
which stage bounds it (reading, the model, or the file system at ``--storage-gbps``).

    python benchmarks/estimate_cluster.py --model-dir /tmp/pcam-tmp --model pcam-r4m
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# rotmnist-r4/3 on one H200, ONNX Runtime CUDA, fp16 graph, batch 64 (docs/benchmarks.md, 2026-11-26)
H200_REFERENCE_IMAGES_PER_S = 1368.0


def newest(model_dir: Path, name: str) -> Path:
    versions = sorted((v for v in (model_dir / name).iterdir() if (v / "card.json").is_file()),
                      key=lambda v: (len(v.name), v.name))
    return versions[-1]


def model_rate(folder: Path, batch: int, seconds: float) -> float:
    import onnxruntime as ort

    card = json.loads((folder / "card.json").read_text())
    shape = (card["input"]["height"], card["input"]["width"], card["input"]["channels"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    session.run(None, {"image": x})
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {"image": x})
        done += batch
    return done / (time.perf_counter() - t0)


def read_rate(slide_path: Path, mpp: float, tile: int, repeats: int) -> tuple[float, dict]:
    """Tiles/s reading every tile of the slide's grid one by one, as the scorer resamples them."""
    from PIL import Image

    from service.scoring.slide_reader import open_slide
    from service.scoring.tiling import plan_tiles

    with open_slide(slide_path) as slide:
        plan = plan_tiles(slide.dimensions, slide.level_downsamples, slide.mpp, mpp, tile)
        n, t0 = 0, time.perf_counter()
        for _ in range(repeats):
            for row in range(plan.rows):
                for col in range(plan.cols):
                    x0, y0 = plan.origin(col, row)
                    region = slide.read(x0, y0, plan.level, plan.read_size, plan.read_size)
                    if plan.resample:
                        region = np.asarray(Image.fromarray(region).resize((tile, tile), Image.Resampling.BILINEAR))
                    n += 1
        rate = n / (time.perf_counter() - t0)
    return rate, {"tiles": plan.count, "level": plan.level, "read_px": plan.read_size, "resample": plan.resample}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="pcam-r4m")
    p.add_argument("--reference", default="rotmnist-r4/3", help="graph whose H200 throughput is known (name/version)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--slide", type=Path, default=None, help="default: GSA_TEST_DATA's slides/cmu_small_region.svs")
    p.add_argument("--read-repeats", type=int, default=5)
    p.add_argument("--slides", type=int, default=10_000)
    p.add_argument("--tissue-mm2", type=float, default=150.0, help="tissue per slide (a resection: 1-2 cm2)")
    p.add_argument("--slide-gb", type=float, default=1.5, help="file size of one 40x slide")
    p.add_argument("--read-fraction", type=float, default=0.07,
                   help="fraction of the file read at ~1 um/px (the 4x level of a 40x pyramid)")
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--cores", type=int, default=32, help="cores per CPU node")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per GPU node")
    p.add_argument("--gpu-tiles-per-s", type=float, default=None, help="a measured GPU figure for the model")
    p.add_argument("--storage-gbps", type=float, default=20.0, help="aggregate file-system read, GB/s")
    args = p.parse_args(argv)

    from data_paths import SLIDE, data_path

    folder = newest(args.model_dir, args.model)
    card = json.loads((folder / "card.json").read_text())
    tile, mpp = card["input"]["height"], card["mpp"]
    ref_name, ref_version = args.reference.split("/")
    ref = ROOT / "models" / ref_name / ref_version

    model_cpu = model_rate(folder, args.batch, args.seconds)
    ref_cpu = model_rate(ref, args.batch, args.seconds)
    read_cpu, plan = read_rate(args.slide or data_path(SLIDE), mpp, tile, args.read_repeats)
    print(f"measured on this machine, 1 thread each: model {args.model}/{folder.name} at batch {args.batch}: "
          f"{model_cpu:.1f} tiles/s ({1000 / model_cpu:.1f} ms a tile); reference {args.reference}: {ref_cpu:.1f} images/s; "
          f"reading {read_cpu:.0f} tiles/s ({1000 / read_cpu:.2f} ms a tile; {plan})")
    if args.gpu_tiles_per_s:
        gpu, gpu_note = args.gpu_tiles_per_s, "measured (--gpu-tiles-per-s)"
    else:
        gpu = H200_REFERENCE_IMAGES_PER_S * model_cpu / ref_cpu
        gpu_note = (f"EXTRAPOLATED: the reference's H200 fp16 figure ({H200_REFERENCE_IMAGES_PER_S:g}/s) times the "
                    f"CPU cost ratio {model_cpu / ref_cpu:.3f}; not measured")
    tile_mm = tile * mpp / 1000
    tiles_per_slide = args.tissue_mm2 / tile_mm**2
    tiles = tiles_per_slide * args.slides
    print(f"\n{args.slides:,} slides x {args.tissue_mm2:g} mm2 of tissue = {tiles_per_slide:,.0f} tiles a slide "
          f"({tile} px at {mpp} um/px = {tile_mm * 1000:.1f} um a side, {1 / tile_mm**2:.1f} tiles/mm2), {tiles / 1e6:,.1f} M tiles")
    read_bytes = args.slides * args.slide_gb * args.read_fraction * 1e9
    storage_h = read_bytes / (args.storage_gbps * 1e9) / 3600
    print(f"bytes read: {read_bytes / 1e12:.1f} TB ({args.read_fraction:.0%} of {args.slide_gb:g} GB a slide); "
          f"at {args.storage_gbps:g} GB/s aggregate: {storage_h:.2f} h")

    cores = args.nodes * args.cores
    cpu_core_s = tiles * (1 / model_cpu + 1 / read_cpu)
    cpu_h = cpu_core_s / cores / 3600
    print(f"\nCPU: {args.nodes} nodes x {args.cores} cores = {cores} cores; model {tiles / model_cpu / 3600:,.0f} core-hours, "
          f"reading {tiles / read_cpu / 3600:,.0f} core-hours; wall {cpu_h:.1f} h at perfect scaling "
          f"({cpu_h * 60 / (args.slides / cores):.1f} min a slide on one core); bound by "
          f"{'the model' if model_cpu < read_cpu else 'reading'} ({100 * (1 / model_cpu) / (1 / model_cpu + 1 / read_cpu):.0f}% of a core's time)")
    gpus = args.nodes * args.gpus
    gpu_h = tiles / (gpus * gpu) / 3600
    readers_needed = gpu / read_cpu
    print(f"GPU: {gpus} GPUs at {gpu:,.0f} tiles/s each ({gpu_note}): model {gpu_h:.2f} h; feeding one GPU takes "
          f"{readers_needed:.1f} reader cores ({args.cores} per node: "
          f"{'enough' if readers_needed <= args.cores - 2 else 'NOT enough'}); the run is bound by "
          f"{max((gpu_h, 'the GPUs'), (storage_h, 'the file system'), (tiles / read_cpu / (args.nodes * (args.cores - 2)) / 3600, 'reading'))[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
