"""A slide archive scored in this process, and on a local Ray cluster with 1 and 2 workers.

    python benchmarks/bench_archive.py [--slides 4] [--side 3072] [--batch-size 32]

Writes ``--slides`` synthetic pyramidal TIFFs (``bench_slides.write_slide``: 0.5 um/px, about half
"tissue") and exports the same small random-weight RGB R4 net as ``bench_slides.py`` (16x16 px at
1 um/px), then scores the archive three times into fresh folders with
``service.distributed.archive.score_archive``: in this process (no Ray, one ONNX Runtime thread),
then on a Ray instance started here (2 CPUs, 127.0.0.1) with 1 and with 2 actors (one ONNX
Runtime thread each). Prints tiles/s of each, the ratios to the in-process run, Ray's start-up,
and Ray's overhead per slide (the 1-actor run's wall time less the in-process run's, over the
slides). The outputs of the three runs are compared byte for byte.

The ceiling here is the machine's cores: 2 actors on 2 cores can at best double the rate, less
whatever else runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_slides import export_model, write_slide  # noqa: E402  (beside this script)

from service.distributed.archive import score_archive  # noqa: E402
from service.scoring.slide_scoring import SlideOptions  # noqa: E402

COMPARED = ("tiles.csv", "tiles.geojson", "heatmap.npy", "heatmap.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--side", type=int, default=3072, help="level-0 pixels a side of each slide")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray socket on loopback: before the import
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
        tmp = Path(tmp)
        (tmp / "slides").mkdir()
        for i in range(args.slides):
            write_slide(tmp / "slides" / f"slide{i}.tiff", args.side)
        model_dir, model = export_model(tmp / "models", 16)
        options = SlideOptions(batch_size=args.batch_size)
        runs = {}

        def run(label: str, address: str | None, workers: int) -> None:
            summary = score_archive(tmp / "slides", tmp / label, model_dir=model_dir, model=model, options=options,
                                    ray_address=address, workers=workers, threads=1)
            assert summary["done"] == args.slides, summary["failed"]
            runs[label] = summary
            print(f"{label:>10}: {summary['tiles']} tiles of {args.slides} slides in {summary['seconds']:.1f} s, "
                  f"{summary['tiles_per_s']:.1f} tiles/s", flush=True)

        run("process", None, 1)
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        start_s = time.perf_counter() - t0
        try:
            run("ray-1", "local", 1)
            run("ray-2", "local", 2)
        finally:
            ray.shutdown()
        for label in ("ray-1", "ray-2"):
            for i in range(args.slides):
                for name in COMPARED:
                    a = (tmp / "process" / f"slide{i}" / name).read_bytes()
                    assert a == (tmp / label / f"slide{i}" / name).read_bytes(), (label, i, name)
        base = runs["process"]
        print(f"Ray start-up (ray.init, 2 CPUs): {start_s:.1f} s (not in the runs above)")
        for label in ("ray-1", "ray-2"):
            print(f"{label} / process: {runs[label]['tiles_per_s'] / base['tiles_per_s']:.2f}x tiles/s")
        print(f"Ray overhead per slide (1 actor, actor start included): "
              f"{(runs['ray-1']['seconds'] - base['seconds']) / args.slides:.2f} s; outputs identical in all three runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
