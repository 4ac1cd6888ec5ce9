"""Command line: ``gsa train`` and ``gsa evaluate`` (also ``python -m training.cli``).

Examples::

    python -m training.cli train --config configs/rotmnist_r4.yaml --set train.epochs=50
    python -m training.cli train --config configs/rotmnist_r4.yaml --resume runs/rotmnist_r4/checkpoint_latest.pt
    python -m training.cli evaluate --checkpoint runs/rotmnist_r4/checkpoint_best.pt \\
        --data ../shared/data/mnist/mnist-train-10k.npz --split val

``evaluate`` writes one JSON document (accuracy with its 95% Wilson interval, per-class accuracy, exact quarter-turn and
bilinear rotation tables) to stdout and, with ``--output``, to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from training.config import load_yaml
from torch.utils.data import DataLoader, Subset

__all__ = ["main", "build_parser"]

logger = logging.getLogger("training.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa", description="Train and evaluate GSA-Nets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", type=Path, help="YAML config (defaults when omitted)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. train.batch_size=64 (repeatable)")
    train.add_argument("--resume", type=Path, help="checkpoint to resume from")
    train.add_argument("--force", action="store_true", help="resume even if the data fingerprint differs")

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint, with rotated inputs")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--data", required=True, help="dataset root (file or folder)")
    ev.add_argument("--dataset", help="dataset name (default: the one the checkpoint was trained on)")
    ev.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ev.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="dataset option, e.g. rotation_seed=1 (repeatable)")
    ev.add_argument("--angle-step", type=float, default=15.0, help="degrees between bilinear rotations (0: none)")
    ev.add_argument("--no-turns", action="store_true",
                    help="skip the passes under quarter turns and the mirror (a model known to be invariant)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--chunk-elements", type=int, metavar="N",
                    help="scores per attention chunk (default: the checkpoint's, at most 2^18 on CPU; outputs do not "
                         "depend on it, speed does: 2^18 suits CPU caches, 2^24 a GPU)")
    ev.add_argument("--output", type=Path, help="also write the JSON report here")
    ev.add_argument("--no-progress", action="store_true")
    return parser


def _train(args: argparse.Namespace) -> int:
    from training.config import load_config, save_config
    from training.data.factory import build_dataset
    from training.networks import create_model
    from training.trainer import Trainer, seed_everything

    config = load_config(args.config, args.overrides)
    seed_everything(config.train.seed)
    data = config.data
    train_set = build_dataset(data.name, data.root, data.train_split, **{**data.options, **data.train_options})
    val_set = build_dataset(data.name, data.root, data.val_split, **data.options)
    model = create_model(config.model.name, **config.model.overrides)
    logger.info("model %s: %d parameters", model.name, sum(p.numel() for p in model.parameters()))
    trainer = Trainer(model, train_set, val_set, config)
    if args.resume is not None:
        trainer.resume(args.resume, force=args.force)
    save_config(config, trainer.out_dir / "config.yaml")
    history = trainer.fit()
    summary = {"out_dir": str(trainer.out_dir), "epochs": trainer.epoch, "best": trainer.best,
               "last": history[-1] if history else None}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item}: expected key=value")
        options[key] = load_yaml(raw)
    return options


def _evaluate(args: argparse.Namespace) -> int:
    from training.attention_base import DEFAULT_CHUNK_ELEMENTS
    from training.checkpoint import load_model
    from training.data.factory import build_dataset
    from training.evaluate import evaluate_rotations
    from training.trainer import resolve_device

    if args.chunk_elements is not None and args.chunk_elements < 1:
        raise ValueError(f"--chunk-elements must be >= 1, got {args.chunk_elements}")
    model, ckpt = load_model(args.checkpoint)
    device = resolve_device(args.device)
    chunk = args.chunk_elements
    if chunk is None and device.type == "cpu":
        chunk = min(model.config.chunk_elements, DEFAULT_CHUNK_ELEMENTS)  # GPU-sized chunks thrash CPU caches
    if chunk is not None:
        for layer in model.attention_layers():
            layer.chunk_elements = chunk
    trained_on = (ckpt.get("train_config") or {}).get("data", {})
    name = args.dataset or trained_on.get("name")
    if name is None:
        raise ValueError(f"{args.checkpoint} does not record its dataset; pass --dataset")
    options = dict(trained_on.get("options", {})) if name == trained_on.get("name") else {}
    options.update(_parse_options(args.options))
    dataset = build_dataset(name, args.data, args.split, **options)
    if args.max_samples is not None:
        dataset = Subset(dataset, range(min(args.max_samples, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    angles = [i * args.angle_step for i in range(int(360 // args.angle_step))] if args.angle_step > 0 else []
    report = evaluate_rotations(model.to(device), loader, model.config.num_classes, device, angles,
                                model.config.labels(), progress=not args.no_progress, turns=not args.no_turns)
    report = {"checkpoint": str(args.checkpoint), "model": ckpt["model_name"], "epoch": ckpt["epoch"],
              "dataset": name, "data": str(args.data), "split": args.split, **report}
    text = json.dumps(report, indent=2)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsa`` console script; returns the exit status."""
    from training.checkpoint import CheckpointError
    from training.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _train(args) if args.command == "train" else _evaluate(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
