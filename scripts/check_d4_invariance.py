"""Exact D4 invariance of an exported graph on real patches, measured with ONNX Runtime.

Every patch goes through the graph under all 8 elements of D4 (quarter turns, with and without a
mirror); the script prints the largest difference of the probabilities from the upright patch's,
how many patches change their label under some element, and (with ``--json``) writes the figures.

    python scripts/check_d4_invariance.py models/pcam-r4m/1 ../shared/data/pcam-subset/valid [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsa_contract import GRAPH_FILE, INPUT_NAME, PROBABILITIES, read_card  # noqa: E402

D4 = [(k, flip) for flip in (False, True) for k in range(4)]  # k quarter turns, then a left-right mirror


def d4(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``[N, H, W, C]`` under one D4 element (exact on the grid)."""
    out = np.rot90(images, k, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def load_patches(folder: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``folder/{0,1}/*`` image patches -> uint8 ``[N, H, W, 3]`` and labels ``[N]``."""
    files = [(p, int(d.name)) for d in sorted(folder.iterdir()) if d.is_dir() and d.name.isdigit()
             for p in sorted(d.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff")]
    if limit:
        rng = np.random.default_rng(0)
        files = [files[i] for i in sorted(rng.choice(len(files), min(limit, len(files)), replace=False))]
    images = []
    for path, _ in files:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB")))
    return np.stack(images), np.array([label for _, label in files])


def measure(version: Path, images: np.ndarray, batch: int = 64, threads: int = 0) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(version / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
    probs = np.zeros((len(D4), len(images), read_card(version).num_classes), np.float32)
    for start in range(0, len(images), batch):
        part = images[start:start + batch]
        for e, (k, flip) in enumerate(D4):
            probs[e, start:start + batch] = session.run([PROBABILITIES], {INPUT_NAME: d4(part, k, flip)})[0]
    diff = np.abs(probs - probs[0:1]).max(axis=(0, 2))  # N: largest change over elements and classes
    labels = probs.argmax(-1)  # 8, N
    return {"probs": probs[0], "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "label_changes": int((labels != labels[0:1]).any(axis=0).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("version", type=Path, help="a model version folder (model.onnx, card.json)")
    p.add_argument("patches", type=Path, help="folder with class sub-folders 0/ and 1/")
    p.add_argument("--limit", type=int, default=None, help="a seeded sample of this many patches")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    images, labels = load_patches(args.patches, args.limit)
    t0 = time.perf_counter()
    result = measure(args.version, images, threads=args.threads)
    accuracy = float((result.pop("probs").argmax(-1) == labels).mean())
    report = {"version": str(args.version), "patches": len(images), "elements": len(D4),
              "seconds": round(time.perf_counter() - t0, 1), "accuracy_upright": accuracy, **result}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
