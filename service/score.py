"""``python -m service.score``: score a whole slide or a patch set from the command line, with the
engine the service's jobs use (no torch).

    python -m service.score slide SLIDE --model NAME [--version V] --out DIR [--stride 96 | --overlap 0.5]
    python -m service.score patches SOURCE --model NAME --out DIR [--fit crop] [--labels y.h5]
    python -m service.score slides FOLDER|GLOB|MANIFEST.csv --model NAME --out DIR
        [--ray-address local|auto|ray://host:10001] [--workers N]

Exit status: 0 done, 1 some slides of an archive failed (listed in summary.json), 2 bad input (the
message says what), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from service.scoring.scoring_errors import ScoringError
from service.scoring.patch_scoring import PatchOptions, score_patches
from service.scoring.slide_scoring import SlideOptions, score_slide
from service.settings import Settings

__all__ = ["main", "find_version", "load_model", "ProgressBar"]

log = logging.getLogger("service.score")


class ProgressBar:
    """A one-line progress bar on stderr (a plain line per 10% when stderr is not a terminal)."""

    def __init__(self, what: str, stream=None, width: int = 30):
        self.what, self.stream, self.width = what, stream or sys.stderr, width
        self.t0 = time.perf_counter()
        self._last = -1.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        if not self._tty and frac < 1 and frac - self._last < 0.1:
            return
        self._last = frac
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        bar = "#" * int(frac * self.width)
        line = f"{self.what} [{bar:<{self.width}}] {done}/{total} {frac:6.1%} {rate:7.1f}/s"
        self.stream.write(("\r" + line) if self._tty else line + "\n")
        if self._tty and done >= total:
            self.stream.write("\n")
        self.stream.flush()


def newest_valid(entries) -> dict:
    """``{name: entry}``: each model's newest valid version (its default) among repository entries."""
    from service.repository import version_key

    newest: dict = {}
    for e in sorted((e for e in entries if e.valid), key=lambda e: version_key(e.version)):
        newest[e.name] = e
    return newest


def find_version(model_dir: Path, name: str | None, version: str | None):
    """The repository entry (card and sha256 checked) of one version: the newest valid one when
    ``version`` is None; of the best pathology model when ``name`` is None."""
    from service.repository import ModelRepository, best_pathology_model, version_key

    scanned = ModelRepository(model_dir).scan()
    if name is None:
        name = best_pathology_model(e.card for e in newest_valid(scanned).values())
        if name is None:
            raise ScoringError(f"name the model with --model: {model_dir} holds no pathology model "
                               "(RGB, with an 'mpp' in its card) to default to")
        log.info("model: %s (the best pathology model in %s)", name, model_dir)
    entries = [e for e in scanned if e.name == name]
    if not entries:
        raise ScoringError(f"unknown model '{name}' in {model_dir}")
    if version is None:
        valid = [e for e in entries if e.valid]
        entry = max(valid or entries, key=lambda e: version_key(e.version))
    else:
        matches = [e for e in entries if e.version == version]
        if not matches:
            raise ScoringError(f"model '{name}' has no version '{version}' in {model_dir} "
                               f"(versions: {', '.join(e.version for e in entries)})")
        entry = matches[0]
    if not entry.valid:
        raise ScoringError(f"model {entry.name}/{entry.version} cannot be loaded: {entry.error}")
    return entry


def load_model(model_dir: Path, name: str, version: str | None, threads: int = 0):
    """Load one version from the model repository as an OnnxModel (see ``find_version``)."""
    from service.runtime import open_session

    entry = find_version(model_dir, name, version)
    settings = Settings(model_dir=model_dir, device="cpu", warmup=False, intra_op_threads=threads)
    try:
        return open_session(entry, settings)
    except Exception as exc:
        raise ScoringError(f"model {entry.name}/{entry.version} cannot be loaded: {type(exc).__name__}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.score", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None,
                        help="model name in the repository (default: the best pathology model there, "
                             "RGB with an mpp, by its card's validation accuracy)")
    common.add_argument("--version", default=None, help="model version (default: the newest)")
    common.add_argument("--model-dir", type=Path, default=Path("models"), help="model repository (default: models)")
    common.add_argument("--out", type=Path, required=True, help="folder for the result files")
    common.add_argument("--batch-size", type=int, default=32)
    common.add_argument("--readers", type=int, default=1, help="reader threads")
    common.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_argument("--embeddings", choices=("none", "invariant", "full"), default="none",
                        help="write embeddings.h5: per-item invariant features [D] (invariant), also [D, |H|] "
                             "(full); the model must be exported with features")

    tiling = argparse.ArgumentParser(add_help=False)
    g = tiling.add_mutually_exclusive_group()
    g.add_argument("--stride", type=int, default=None, help="model pixels between tiles (default: tile size)")
    g.add_argument("--overlap", type=float, default=None, help="fraction of a tile shared with its neighbour")
    tiling.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction a tile needs (default 0.5)")
    tiling.add_argument("--tissue", choices=("otsu", "none"), default="otsu")
    tiling.add_argument("--slide-mpp", type=float, default=None, help="slide resolution when the file lacks one")
    tiling.add_argument("--heatmap-label", default=None, help="label drawn in heatmap.png (default: the last)")

    s = sub.add_parser("slide", parents=[common, tiling], help="score a whole slide")
    s.add_argument("path", type=Path, help="slide (SVS, NDPI, MRXS, tiled TIFF, ... or PNG/JPEG/TIFF)")

    a = sub.add_parser("slides", parents=[common, tiling], help="score a slide archive (on Ray with --ray-address)")
    a.add_argument("path", help="folder of slides, glob pattern (quoted) or CSV manifest with a 'path' column")
    a.add_argument("--ray-address", default=None,
                   help="'local' (a Ray instance on this machine), 'auto' (the running cluster) or "
                        "ray://host:10001; default: score in this process without Ray")
    a.add_argument("--workers", type=int, default=1, help="Ray actors, one model session each (default 1)")
    a.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds the Ray actors have to start and load the model (default 300)")

    q = sub.add_parser("patches", parents=[common], help="score a patch set")
    q.add_argument("path", type=Path, help="PCam .h5, ImageFolder tree, folder of images, .npy or .npz")
    q.add_argument("--labels", default=None, help="labels file (.h5 / .npy) when not found beside the patches")
    q.add_argument("--fit", choices=("error", "resize", "crop"), default="error",
                   help="patches of another size than the model's input")
    return p


def _slide_options(args: argparse.Namespace) -> SlideOptions:
    return SlideOptions(
        stride=args.stride, overlap=args.overlap, min_tissue=args.min_tissue, tissue=args.tissue,
        slide_mpp=args.slide_mpp, heatmap_label=args.heatmap_label, batch_size=args.batch_size,
        readers=args.readers, embeddings=args.embeddings,
    )


def _slides(args: argparse.Namespace) -> int:
    from service.distributed.archive import score_archive

    def progress(record: dict, done: int, total: int) -> None:
        if args.quiet:
            return
        what = (f"{record['tiles']} tiles in {record['seconds']:.1f} s" if record["status"] == "done"
                else f"FAILED: {record['error']}")
        print(f"[{done}/{total}] {record['name']}: {what}", file=sys.stderr, flush=True)

    summary = score_archive(args.path, args.out, model_dir=args.model_dir, model=args.model, version=args.version,
                            options=_slide_options(args), ray_address=args.ray_address, workers=args.workers,
                            threads=args.threads, progress=progress, start_timeout_s=args.start_timeout)
    print(f"{summary['done']} slides scored, {summary['skipped']} already done, {len(summary['failed'])} failed "
          f"of {summary['slides']}; {summary['tiles']} tiles in {summary['seconds']:.1f} s "
          f"({summary['tiles_per_s']:.1f} tiles/s) -> {args.out}/summary.json")
    for failure in summary["failed"]:
        print(f"failed: {failure['name']}: {failure['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cancel = threading.Event()
    progress = None if args.quiet else ProgressBar(args.command)
    try:
        if args.command == "slides":
            return _slides(args)
        model = load_model(args.model_dir, args.model, args.version, args.threads)
        if args.command == "slide":
            meta = score_slide(model, args.path, args.out, _slide_options(args), progress=progress, cancel=cancel)
            counts = meta["counts"]
            print(f"{counts['scored_tiles']} of {counts['grid_tiles']} tiles scored "
                  f"({counts['skipped_tiles']} without tissue) in {meta['timing']['total_s']:.1f} s -> {args.out}")
        else:
            options = PatchOptions(fit=args.fit, labels_path=args.labels, batch_size=args.batch_size,
                                   readers=args.readers, embeddings=args.embeddings)
            meta = score_patches(model, args.path, args.out, options, progress=progress, cancel=cancel)
            print(f"{meta['counts']['scored']} patches scored in {meta['timing']['total_s']:.1f} s -> {args.out}")
            if meta["summary"]:
                s = meta["summary"]
                print(json.dumps({k: s[k] for k in ("count", "accuracy", "roc_auc")}))
    except ScoringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        cancel.set()
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
