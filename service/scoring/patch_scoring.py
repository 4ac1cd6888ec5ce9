"""Patch sets: a PCam HDF5 file (``*_x.h5`` with its ``*_y.h5``), an ImageFolder tree
(``root/<class>/*.png``), a flat folder of images, or a ``.npy``/``.npz`` array. Patches are read
a batch at a time (HDF5 slices, memory-mapped ``.npy``, images decoded in the reader threads)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from service import __version__
from gsa_contract import ModelCard
from service.errors import ServiceError
from service.images import ImageLimits, decode_image, to_model_channels
from service.scoring.checkpoint import Checkpoint, digest
from service.scoring.scoring_errors import BadParameter, CorruptInput, InputNotFound, UnsupportedFormat
from service.scoring.evaluation import summary
from service.scoring.outputs import EMBEDDING_MODES, EMBEDDINGS_FILE, atomic_open, csv_writer, write_embeddings, write_json
from service.scoring.pipeline import ScoringModel, score_items
from service.scoring.slide_scoring import Progress, embedding_attrs, model_info

__all__ = ["PatchOptions", "PatchSet", "PATCH_RESULTS", "open_patches", "score_patches"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PATCH_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
PATCH_RESULTS = ("patches.csv", "summary.json", "metadata.json")


_MAX = {"batch_size": 1024, "readers": 16, "prefetch": 64, "mask_size": 8192}  # bounds memory and threads


@dataclass
class PatchOptions:
    fit: str = "error"  # patches of another size: "error", "resize" (bilinear) or "crop" (centre crop)
    labels_path: str | None = None  # labels file for .h5 / .npy sets (PCam: found beside *_x.h5 as *_y.h5)
    batch_size: int = 32
    readers: int = 1
    prefetch: int = 4
    embeddings: str = "none"  # "invariant": embeddings.h5 with per-patch [D] features; "full": also [D, |H|]
    convert: bool = False  # RGB patches for a greyscale model: converted (luma) only when true, as in predict

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatchOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadParameter(f"unknown patch options {unknown} (known: {sorted(known)})")
        return cls(**data).checked()

    def checked(self) -> "PatchOptions":
        if self.fit not in ("error", "resize", "crop"):
            raise BadParameter(f"fit must be 'error', 'resize' or 'crop', got {self.fit!r}")
        if self.embeddings not in EMBEDDING_MODES:
            raise BadParameter(f"embeddings must be one of {list(EMBEDDING_MODES)}, got {self.embeddings!r}")
        for name in ("batch_size", "readers", "prefetch"):
            if not 1 <= getattr(self, name) <= _MAX[name]:
                raise BadParameter(f"{name} must be in 1..{_MAX[name]}, got {getattr(self, name)}")
        return self


@dataclass
class PatchSet:
    """``read(start, stop)`` gives ``[n, h, w, c]`` uint8 patches as stored."""

    kind: str
    ids: list[str]
    read: Callable[[int, int], np.ndarray]
    labels: np.ndarray | None = None  # indices into the model's labels
    close: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self.ids)


def open_patches(path: str | Path, model_labels: tuple[str, ...], labels_path: str | Path | None = None) -> PatchSet:
    """Recognise the kind of patch set at ``path`` and open it lazily."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, model_labels)
    if not path.is_file():
        raise InputNotFound(f"patch set {path.name} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _open_hdf5(path, Path(labels_path) if labels_path else None, len(model_labels))
    if suffix in (".npy", ".npz"):
        return _open_array(path, Path(labels_path) if labels_path else None, len(model_labels))
    raise UnsupportedFormat(f"{path.name}: patch sets are PCam HDF5 (.h5), .npy, .npz or a folder of images")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _decode(path: Path) -> np.ndarray:
    try:
        return decode_image(path, ImageLimits(), f"patch {path.name}", convert_modes=True, formats=PATCH_FORMATS)
    except ServiceError as exc:
        raise CorruptInput(exc.message) from None


def _open_folder(root: Path, model_labels: tuple[str, ...]) -> PatchSet:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))
    if classes:
        index = _class_index([d.name for d in classes], model_labels)
        files = [(p, index[d.name]) for d in classes for p in _images_in(d)]
        kind = "imagefolder"
    else:
        files = [(p, -1) for p in _images_in(root)]
        kind = "folder"
    if not files:
        raise InputNotFound(f"{root.name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    paths = [p for p, _ in files]
    labels = np.array([c for _, c in files], np.int64) if kind == "imagefolder" else None

    def read(start: int, stop: int) -> np.ndarray:
        return _stack([_decode(p) for p in paths[start:stop]], paths[start])

    return PatchSet(kind, [str(p.relative_to(root)) for p in paths], read, labels)


def _class_index(names: list[str], model_labels: tuple[str, ...]) -> dict[str, int]:
    """Folder names are model labels, or label indices (PCam's "0"/"1")."""
    if all(n in model_labels for n in names):
        return {n: model_labels.index(n) for n in names}
    if all(n.isdigit() and int(n) < len(model_labels) for n in names):
        return {n: int(n) for n in names}
    raise BadParameter(f"class folders {names} are neither the model's labels {list(model_labels)} nor label indices")


def _stack(arrays: list[np.ndarray], first: Path) -> np.ndarray:
    if len({a.shape for a in arrays}) > 1:
        raise BadParameter(f"patches from {first.name} on differ in size: {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def _check_array(x: Any, what: str) -> None:
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise BadParameter(f"{what} has shape {list(x.shape)}; expected [N, H, W] or [N, H, W, C] with C 1 or 3")
    if x.dtype != np.uint8:
        raise BadParameter(f"{what} holds {x.dtype}; expected uint8 pixels")


def _labels_from(y: Any, n: int, k: int, what: str) -> np.ndarray:
    labels = np.asarray(y).reshape(len(y), -1)[:, 0].astype(np.int64)
    if len(labels) != n:
        raise BadParameter(f"{what} holds {len(labels)} labels for {n} patches")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= k:
        raise BadParameter(f"{what} holds labels outside 0..{k - 1}")
    return labels


def _open_hdf5(path: Path, labels_path: Path | None, k: int) -> PatchSet:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CorruptInput(f"{path.name} is not a readable HDF5 file: {exc}") from None
    names = [n for n in f if isinstance(f[n], h5py.Dataset)]
    key = "x" if "x" in names else (names[0] if len(names) == 1 else None)
    if key is None:
        f.close()
        raise BadParameter(f"{path.name} holds datasets {names}; expected one named 'x' (PCam)")
    x = f[key]
    _check_array(x, f"{path.name}:{key}")
    labels = None
    sibling = path.with_name(path.name.replace("_x.", "_y.")) if "_x." in path.name else None
    labels_path = labels_path or (sibling if sibling is not None and sibling.is_file() else None)
    if labels_path is not None:
        try:
            with h5py.File(labels_path, "r") as fy:
                ykey = "y" if "y" in fy else next(iter(fy))
                labels = _labels_from(fy[ykey][()], len(x), k, labels_path.name)
        except OSError as exc:
            f.close()
            raise CorruptInput(f"{labels_path.name} is not a readable HDF5 file: {exc}") from None
    lock = threading.Lock()  # h5py serialises access anyway; the lock keeps it explicit

    def read(start: int, stop: int) -> np.ndarray:
        with lock:
            return np.asarray(x[start:stop])

    return PatchSet("pcam-hdf5", [str(i) for i in range(len(x))], read, labels, f.close)


def _open_array(path: Path, labels_path: Path | None, k: int) -> PatchSet:
    try:
        if path.suffix.lower() == ".npy":
            x, y = np.load(path, mmap_mode="r"), None
        else:
            with np.load(path) as z:
                xkey = next((n for n in ("x", "images", "X") if n in z.files), None)
                if xkey is None:
                    raise BadParameter(f"{path.name} holds {z.files}; expected images under 'x' or 'images'")
                x = z[xkey]
                ykey = next((n for n in ("y", "labels", "Y") if n in z.files), None)
                y = z[ykey] if ykey else None
        if labels_path is not None:
            y = np.load(labels_path)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptInput(f"{path.name} could not be read as a numpy array: {exc}") from None
    _check_array(x, path.name)
    labels = _labels_from(y, len(x), k, "labels") if y is not None else None
    return PatchSet(path.suffix.lower()[1:], [str(i) for i in range(len(x))], lambda a, b: np.asarray(x[a:b]), labels)


def fit_patches(batch: np.ndarray, card: ModelCard, fit: str, convert: bool = False) -> np.ndarray:
    """``[n, h, w, c]`` -> the model's ``[n, H, W, C]``; colours by the rules of predict
    (:func:`service.images.to_model_channels`)."""
    if batch.ndim == 3:
        batch = batch[..., None]
    n, h, w, c = batch.shape
    try:
        batch = to_model_channels(batch, card, convert, "the patch set")
    except ServiceError as exc:
        raise BadParameter(exc.message) from None
    if (h, w) == (card.height, card.width):
        return np.ascontiguousarray(batch)
    if fit == "error":
        raise BadParameter(f"patches are {w}x{h} but model '{card.name}' takes {card.width}x{card.height}; "
                           "pass fit='resize' or fit='crop'")
    if fit == "crop":
        if h < card.height or w < card.width:
            raise BadParameter(f"patches of {w}x{h} are smaller than the model's {card.width}x{card.height}: cannot crop")
        top, left = (h - card.height) // 2, (w - card.width) // 2
        return np.ascontiguousarray(batch[:, top:top + card.height, left:left + card.width])
    out = np.empty((n, card.height, card.width, batch.shape[3]), np.uint8)
    for i, patch in enumerate(batch):
        img = Image.fromarray(patch[..., 0] if patch.shape[2] == 1 else patch)
        resized = np.asarray(img.resize((card.width, card.height), Image.Resampling.BILINEAR))
        out[i] = resized[..., None] if resized.ndim == 2 else resized
    return out


def score_patches(
    model: ScoringModel,
    path: str | Path,
    out_dir: str | Path,
    options: PatchOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    checkpoint: Checkpoint | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Score every patch; write ``patches.csv``, ``summary.json`` (when labels are known) and
    ``metadata.json`` to ``out_dir``; return the metadata. ``checkpoint`` and ``source_name`` as in
    :func:`service.scoring.slide_scoring.score_slide`."""
    options = (options or PatchOptions()).checked()
    card = model.card
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    patches = open_patches(path, card.labels, options.labels_path)
    try:
        n = len(patches)

        def load(idx: range) -> np.ndarray:
            return fit_patches(patches.read(idx.start, idx.stop), card, options.fit, options.convert)

        fingerprint = {"kind": "patches", "model": card.sha256, "fit": options.fit, "convert": options.convert,
                       "ids": digest(np.array(patches.ids, dtype=object).astype("S"))}
        probs, orient, stats, feats = score_items(
            model, n, load, batch_size=options.batch_size, readers=options.readers, prefetch=options.prefetch,
            cancel=cancel, progress=progress, features=options.embeddings != "none", checkpoint=checkpoint,
            fingerprint=fingerprint)
    finally:
        patches.close()
    labels = card.labels
    angles = [e.angle for e in card.elements]
    with atomic_open(out_dir / "patches.csv", newline="") as f:
        w = csv_writer(f)
        known = patches.labels is not None
        w.writerow(["id", *(["label"] if known else []), *(f"prob_{name}" for name in labels), "predicted",
                    "dominant_orientation_deg"])
        for i, pid in enumerate(patches.ids):
            truth = [labels[patches.labels[i]]] if known else []
            w.writerow([pid, *truth, *(f"{v:.6f}" for v in probs[i]), labels[int(probs[i].argmax())], angles[orient[i]]])
    results = ["patches.csv", "metadata.json"]
    if feats is not None:
        keys = {"ids": np.array([str(i) for i in patches.ids], dtype=object).astype("S")}
        if patches.labels is not None:
            keys["labels"] = np.asarray(patches.labels, np.int64)
        write_embeddings(out_dir / EMBEDDINGS_FILE, feats, keys, options.embeddings, embedding_attrs(card))
        results.insert(1, EMBEDDINGS_FILE)
    summ = None
    if patches.labels is not None:
        summ = summary(patches.labels, probs, labels)
        write_json(out_dir / "summary.json", summ)
        results.insert(1, "summary.json")
    meta = {
        "kind": "patches", "service_version": __version__, "model": model_info(model),
        "source": {"path": source_name or Path(path).name, "kind": patches.kind, "count": n,
                   "labelled": patches.labels is not None},
        "options": {**asdict(options), "labels_path": Path(options.labels_path).name if options.labels_path else None},
        "counts": {"patches": n, "scored": n},
        "timing": {"resumed_from": checkpoint.resumed_from if checkpoint is not None else 0,
                   "total_s": round(time.perf_counter() - t0, 3), "scoring": stats.as_dict()},
        "summary": summ, "results": results,
    }
    write_json(out_dir / "metadata.json", meta)
    return meta
