"""Export a trained GSA-Net to the model repository: ``<out>/<name>/<version>/{model.onnx, card.json}``.

    python -m training.export --checkpoint ckpt.pt --name rotmnist-r4 --version 1 [--out models]
        [--fp16] [--features] [--mpp 0.972] [--metrics eval.json] [--force]

The graph follows DESIGN.md ("The exported graph"); how it is built and checked is in
:mod:`training.export_graph` and :mod:`training.export_checks`. Nothing is written unless the graph
passes the ONNX checker, contains no positional-encoding MLP, and reproduces PyTorch in ONNX
Runtime (max abs diff <= 1e-4). The version folder is assembled in a hidden temporary folder beside
it and renamed into place, so the service (which skips hidden folders) never sees half a version.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from gsa_contract import CARD_FILE, FP16_FILE, GRAPH_FILE, GroupElement, GroupSpec, InputSpec, ModelCard
from training.checkpoint import CheckpointError, load_model
from training.export_checks import check_parity, find_encoding_mlp, run_onnx
from training.export_graph import CHUNK_BATCH, CHUNK_SCORES, DEFAULT_OPSET, ExportParityError, build_graph, to_fp16
from training.networks import GSANet

__all__ = ["PCAM_MPP", "export_model", "build_card", "main"]

logger = logging.getLogger(__name__)

# PCam patches: Camelyon16 slides scanned at 0.243 um/px (40x), undersampled 4x to 10x ("level 2").
PCAM_MPP = 0.972
PARITY_ATOL = 1e-4
FP16_PROB_TOL = 5e-2  # sanity bound (overflow, wrong casts): fp16 probabilities against fp32, random images


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
           "onnxruntime": onnxruntime.__version__}
    try:
        import onnxslim

        out["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return out


def _plain(value: Any) -> Any:
    """JSON-safe copy of checkpoint metadata (tensors and numpy scalars become numbers or lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return np.asarray(value).tolist()
    return value


def build_card(
    model: GSANet,
    name: str,
    version: str,
    files: dict[str, Path],
    export_info: dict[str, Any],
    mpp: float | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    command: str | None = None,
) -> ModelCard:
    """The typed model card of an exported version (:class:`gsa_contract.ModelCard`)."""
    cfg = model.config
    group = model.group
    return ModelCard(
        name=name,
        version=version,
        labels=tuple(cfg.labels()),
        input=InputSpec(cfg.img_size, cfg.img_size, cfg.in_chans, tuple(cfg.mean), tuple(cfg.std)),
        group=GroupSpec(
            group.name,
            tuple(GroupElement(e["index"], e["angle"], e["reflection"]) for e in group.describe()),
            tuple(group.grid_exact_elements()),
        ),
        sha256=_sha256(files[GRAPH_FILE]),
        feature_dim=model.num_features if export_info.get("features") else None,
        mpp=mpp,
        architecture={"model": model.name, "config": _plain(dataclasses.asdict(cfg)),
                      "parameters": sum(p.numel() for p in model.parameters())},
        training=training or {},
        metrics=metrics or {},
        opset=export_info["opset"],
        exporter=export_info["exporter"],
        versions=_versions(),
        export={key: v for key, v in export_info.items() if key not in ("opset", "exporter")},
        files={fname: {"sha256": _sha256(path), "bytes": path.stat().st_size} for fname, path in files.items()},
        fp16_file=FP16_FILE if FP16_FILE in files else None,
        fp16_sha256=_sha256(files[FP16_FILE]) if FP16_FILE in files else None,
        command=command if command is not None else " ".join(sys.argv),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _fp16_parity(fp32: bytes, fp16: bytes, model: GSANet, seed: int = 1) -> dict[str, float]:
    cfg = model.config
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (4, cfg.img_size, cfg.img_size, cfg.in_chans), dtype=np.uint8)
    ref, got = run_onnx(fp32, image), run_onnx(fp16, image)
    if any(v.dtype != np.float32 for v in got.values()):
        raise ExportParityError(f"fp16 graph outputs {[(k, str(v.dtype)) for k, v in got.items()]}, expected float32")
    if not all(np.isfinite(v).all() for v in got.values()):
        raise ExportParityError("fp16 graph gives non-finite outputs on random images")
    diffs = {k: float(np.abs(got[k] - ref[k]).max()) for k in ref}
    diffs["argmax_agreement"] = float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).mean())
    if diffs["probabilities"] > FP16_PROB_TOL:
        raise ExportParityError(
            f"fp16 probabilities differ from fp32 by {diffs['probabilities']:.3g} (> {FP16_PROB_TOL}) on random images"
        )
    return diffs


def export_model(
    model: GSANet,
    out_dir: str | Path,
    name: str,
    version: str | int,
    *,
    features: bool = False,
    fp16: bool = False,
    force: bool = False,
    mpp: float | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    command: str | None = None,
    opset: int = DEFAULT_OPSET,
    chunk_batch: int = CHUNK_BATCH,
    chunk_scores: int = CHUNK_SCORES,
    atol: float = PARITY_ATOL,
) -> Path:
    """Export ``model`` to ``<out_dir>/<name>/<version>/``; returns the path of ``model.onnx``.

    Args:
        model: a GSA-Net (its mode, tables and chunk sizes are restored afterwards).
        out_dir: the model repository.
        name, version: folder names (a version is a string; ``1`` becomes ``"1"``).
        features: also output ``features [N, D, G]``.
        fp16: also write ``model.fp16.onnx`` (fp16 inside, uint8 in and float32 out) for GPU serving.
        force: replace an existing ``name/version``.
        mpp: micrometres per pixel of the input (pathology models).
        training, metrics: provenance and measured metrics for the card.
        command: the producing command for the card (default: ``sys.argv``).
        opset: ONNX opset.
        chunk_batch, chunk_scores: a chunk holds at most ``chunk_scores`` scores at ``chunk_batch`` images.
        atol: parity bound, ONNX Runtime against PyTorch.

    Raises:
        FileExistsError: ``name/version`` exists and ``force`` is False.
        ExportParityError: the graph does not reproduce the model (nothing is written).
    """
    version = str(version)
    for part in (name, version):
        if not part or part.startswith(".") or "/" in part or "\\" in part or part in ("..",):
            raise ValueError(f"invalid model name or version {part!r}")
    root = Path(out_dir)
    final = root / name / version
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists; choose another version or pass --force to replace it")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")

    result = build_graph(model, features, opset, chunk_batch, chunk_scores)
    leftovers = find_encoding_mlp(result.model, model)
    if leftovers:
        raise ExportParityError("the positional-encoding MLP is still in the graph: " + "; ".join(leftovers))
    parity = check_parity(result.model, model, features, atol=atol)
    fp32_bytes = result.model.SerializeToString()
    info: dict[str, Any] = {
        "opset": result.opset, "exporter": result.exporter, "features": features,
        "fallback_reason": result.fallback_reason, "simplifier": result.simplifier,
        "chunk_queries": result.chunk_queries,
        "chunk_bound": f"<= {chunk_scores} scores per chunk at batch {chunk_batch}",
        "parity": {"atol": atol, "max_abs_diff": parity, "runtime": "onnxruntime CPUExecutionProvider"},
        "nodes": len(result.model.graph.node),
    }
    info["graph_layout"] = "per-image loop (ONNX Scan)" if result.per_image else "batched"
    fp16_bytes = None
    if fp16:  # for GPUs, which do gain from batching: the batched graph
        batched = build_graph(model, features, opset, chunk_batch, chunk_scores, per_image=False).model
        fp16_bytes = to_fp16(batched).SerializeToString()
        info["fp16_graph_layout"] = "batched"
        info["fp16_parity"] = {"vs": "fp32 graph, onnxruntime CPU", "max_abs_diff": _fp16_parity(fp32_bytes, fp16_bytes, model)}

    (root / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root / name))
    try:
        files = {GRAPH_FILE: tmp / GRAPH_FILE}
        files[GRAPH_FILE].write_bytes(fp32_bytes)
        if fp16_bytes is not None:
            files[FP16_FILE] = tmp / FP16_FILE
            files[FP16_FILE].write_bytes(fp16_bytes)
        card = build_card(model, name, version, files, info, mpp, training, metrics, command)
        (tmp / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, final, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s/%s (%s, opset %d, parity %.2e)", name, version, result.exporter, result.opset,
                parity["logits"])
    return final / GRAPH_FILE


def _replace_dir(tmp: Path, final: Path, force: bool) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (only with ``force``) is moved aside first."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if not force:  # appeared while we were exporting
        raise FileExistsError(f"{final} already exists; pass --force to replace it")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- command line ------------------------------------------------------------------------------
def _checkpoint_provenance(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(training, metrics)`` for the card from what a checkpoint records."""
    train_config = ckpt.get("train_config") or {}
    training = {
        "data": train_config.get("data"),
        "data_fingerprint": ckpt.get("data_fingerprint"),
        "epochs": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "train_config": train_config or None,
    }
    history = ckpt.get("history") or []
    times = [r.get("time_s") for r in history]
    if history and all(isinstance(t, (int, float)) for t in times):
        training["time_s"] = round(sum(times), 1)  # training and validation, every epoch to this one
    devices = sorted({r["device"] for r in history if r.get("device")})
    if devices:
        training["devices"] = devices
    metrics = {"best": ckpt.get("best"), "last_epoch": history[-1] if history else None}
    return _plain({k: v for k, v in training.items() if v is not None}), _plain({k: v for k, v in metrics.items() if v})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by the trainer")
    p.add_argument("--name", required=True, help="model name in the repository (folder name)")
    p.add_argument("--version", required=True, help="version (folder name), e.g. 1")
    p.add_argument("--out", default="models", help="model repository (default: models)")
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx for GPU serving")
    p.add_argument("--features", action="store_true", help="also output features [N, D, G]")
    p.add_argument("--mpp", type=float, default=None,
                   help=f"input resolution in micrometres per pixel (default for PCam models: {PCAM_MPP})")
    p.add_argument("--metrics", default=None, help="JSON file of measured metrics (e.g. test accuracy) for the card")
    p.add_argument("--machine", default=None, help="the machine the model was trained on, for the card")
    p.add_argument("--train-command", default=None, help="the command(s) that trained the checkpoint, for the card")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--force", action="store_true", help="replace an existing name/version")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)  # the exporter's dependencies stay quiet
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        model, ckpt = load_model(args.checkpoint)
        training, metrics = _checkpoint_provenance(ckpt)
        if args.machine:
            training["machine"] = args.machine
        if args.train_command:
            training["command"] = args.train_command
        if args.metrics:
            metrics.update(json.loads(Path(args.metrics).read_text(encoding="utf-8")))
        mpp = args.mpp
        if mpp is None and model.name.startswith("gsa_pcam"):
            mpp = PCAM_MPP
            logger.info("PCam model: recording %.3f um/px (pass --mpp to override)", mpp)
        path = export_model(
            model, args.out, args.name, args.version, features=args.features, fp16=args.fp16, force=args.force,
            mpp=mpp, training=training, metrics=metrics, opset=args.opset,
            command=" ".join(["python", "-m", "training.export", *args_list]),
        )
    except (CheckpointError, FileExistsError, ExportParityError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
