"""The export contract between ``training`` (writes) and ``service`` (reads): one home, no torch,
no FastAPI, nothing but the standard library.

It owns the graph's input and output names, the file names of a model version's folder, the
group-axis convention and the typed model card (``card.json``) with its validation. A new card
field is added here, once: :meth:`ModelCard.to_dict` writes it and :meth:`ModelCard.from_dict`
reads and checks it. DESIGN.md, "The exported graph", is the prose version.

Axes: N batch, H W spatial, C channels, K classes, G group size, D feature channels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "INPUT_NAME", "LOGITS", "PROBABILITIES", "ORIENTATION_RESPONSES", "FEATURES",
    "REQUIRED_OUTPUTS", "OPTIONAL_OUTPUTS", "OUTPUT_NAMES",
    "GRAPH_FILE", "FP16_FILE", "CARD_FILE", "GROUP_AXIS_CONVENTION", "PREPROCESSING",
    "CardError", "GroupElement", "GroupSpec", "InputSpec", "ModelCard", "read_card",
]

# ---- the graph ---------------------------------------------------------------------------------
INPUT_NAME = "image"  # uint8 [N, H, W, C], raw pixels; scaling and normalisation are in the graph
LOGITS = "logits"  # [N, K]
PROBABILITIES = "probabilities"  # [N, K]
ORIENTATION_RESPONSES = "orientation_responses"  # [N, K, G]
FEATURES = "features"  # [N, D, G], optional: the spatially pooled last hidden layer
REQUIRED_OUTPUTS = (LOGITS, PROBABILITIES, ORIENTATION_RESPONSES)
OPTIONAL_OUTPUTS = (FEATURES,)
OUTPUT_NAMES = REQUIRED_OUTPUTS + OPTIONAL_OUTPUTS  # the order in which a graph lists them

# ---- a version's folder: <repository>/<name>/<version>/ -------------------------------------
GRAPH_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"
CARD_FILE = "card.json"

GROUP_AXIS_CONVENTION = (
    "element i = rotation by angle (counter-clockwise, degrees) after an up-down "
    "mirror when reflection; orientation_responses[..., i] follows this order"
)
PREPROCESSING = "inside the graph: x / 255, then (x - mean) / std per channel"


class CardError(ValueError):
    """A card that is missing fields or contradicts itself."""


@dataclass(frozen=True)
class GroupElement:
    """One element along the group axis: rotation angle in degrees and mirror flag."""

    index: int
    angle: float
    reflection: bool

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "angle": self.angle, "reflection": self.reflection}


@dataclass(frozen=True)
class GroupSpec:
    """The group the network is equivariant to, and the order of its axis in every output."""

    name: str
    elements: tuple[GroupElement, ...]
    grid_exact: tuple[int, ...] = ()  # elements exact on the pixel grid (multiples of 90 degrees, mirrors)
    convention: str = GROUP_AXIS_CONVENTION

    @property
    def order(self) -> int:
        return len(self.elements)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "order": self.order, "elements": [e.as_dict() for e in self.elements],
                "grid_exact": list(self.grid_exact), "convention": self.convention}

    @classmethod
    def from_dict(cls, data: Any) -> "GroupSpec":
        group = _object(data, "group")
        elements = _elements(group)
        order = group.get("order", len(elements))
        if order != len(elements):
            raise CardError(f"group order {order} but {len(elements)} elements listed")
        exact = group.get("grid_exact", [])
        if not isinstance(exact, list) or any(not _is_int(i) or not 0 <= i < len(elements) for i in exact):
            raise CardError(f"card.json 'group.grid_exact' must list element indices, got {exact!r}")
        return cls(str(group.get("name", "")), elements, tuple(exact),
                   str(group.get("convention", GROUP_AXIS_CONVENTION)))


@dataclass(frozen=True)
class InputSpec:
    """The graph's one input: uint8 NHWC pixels of a fixed size, normalised inside the graph."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    preprocessing: str = PREPROCESSING

    def as_dict(self) -> dict[str, Any]:
        return {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                "shape": ["N", self.height, self.width, self.channels],
                "height": self.height, "width": self.width, "channels": self.channels,
                "preprocessing": self.preprocessing, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Any) -> "InputSpec":
        inp = _object(data, "input")
        height, width, channels = (_positive_int(inp, k, "input") for k in ("height", "width", "channels"))
        if inp.get("dtype", "uint8") != "uint8" or inp.get("layout", "NHWC") != "NHWC":
            raise CardError(f"input must be uint8 NHWC, card says {inp.get('dtype')} {inp.get('layout')}")
        if inp.get("name", INPUT_NAME) != INPUT_NAME:
            raise CardError(f"input must be named '{INPUT_NAME}', card says {inp.get('name')!r}")
        if channels not in (1, 3):
            raise CardError(f"input channels must be 1 or 3, card says {channels}")
        mean, std = (_numbers(inp, k, channels) for k in ("mean", "std"))
        return cls(height, width, channels, mean, std, str(inp.get("preprocessing", PREPROCESSING)))


@dataclass(frozen=True)
class ModelCard:
    """What a model version is, typed: written by ``training.export``, read by ``service``.

    The JSON layout is :meth:`to_dict`'s; unknown top-level keys of a card are kept in ``extra``
    and written back unchanged. ``outputs`` is derived (K from ``labels``, G from ``group``, D from
    ``feature_dim``), so it cannot disagree with them.
    """

    name: str
    version: str
    labels: tuple[str, ...]
    input: InputSpec
    group: GroupSpec
    sha256: str  # of GRAPH_FILE
    task: str = "classification"
    feature_dim: int | None = None  # D of the optional FEATURES output; None: the graph has none
    mpp: float | None = None  # micrometres per pixel of the graph's input (pathology models)
    architecture: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    exporter: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)  # of the exporting libraries
    export: dict[str, Any] = field(default_factory=dict)  # how the graph was built and checked
    files: dict[str, Any] = field(default_factory=dict)  # file name -> {sha256, bytes}
    fp16_file: str | None = None
    fp16_sha256: str | None = None
    command: str | None = None  # the command that produced the version
    created: str | None = None  # ISO 8601, UTC
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- what the service reads most -------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def height(self) -> int:
        return self.input.height

    @property
    def width(self) -> int:
        return self.input.width

    @property
    def channels(self) -> int:
        return self.input.channels

    @property
    def group_name(self) -> str:
        return self.group.name

    @property
    def group_order(self) -> int:
        return self.group.order

    @property
    def elements(self) -> tuple[GroupElement, ...]:
        return self.group.elements

    @property
    def patch_um(self) -> float | None:
        """Side of the input in micrometres (pathology models)."""
        return None if self.mpp is None else self.mpp * self.width

    def output_shapes(self) -> dict[str, list[Any]]:
        k, g = self.num_classes, self.group_order
        shapes: dict[str, list[Any]] = {LOGITS: ["N", k], PROBABILITIES: ["N", k], ORIENTATION_RESPONSES: ["N", k, g]}
        if self.feature_dim is not None:
            shapes[FEATURES] = ["N", self.feature_dim, g]
        return shapes

    # ---- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``card.json`` object (key order as written since the first exports)."""
        data = {
            "name": self.name, "version": self.version, "task": self.task, "labels": list(self.labels),
            "input": self.input.as_dict(), "outputs": self.output_shapes(), "group": self.group.as_dict(),
            "mpp": self.mpp, "architecture": self.architecture, "training": self.training,
            "metrics": self.metrics, "opset": self.opset, "exporter": self.exporter, "versions": self.versions,
            "export": self.export, "files": self.files, "sha256": self.sha256, "fp16_file": self.fp16_file,
            "fp16_sha256": self.fp16_sha256, "command": self.command, "created": self.created,
        }
        if self.mpp is not None:  # derived, for people: the patch's side in micrometres
            at = list(data).index("mpp") + 1
            items = list(data.items())
            items.insert(at, ("patch_um", [round(self.input.height * self.mpp, 3), round(self.input.width * self.mpp, 3)]))
            data = dict(items)
        data.update(self.extra)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "ModelCard":
        """Validate a decoded card.json; raises :class:`CardError` naming the first problem."""
        if not isinstance(data, dict):
            raise CardError("card.json must hold a JSON object")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise CardError(f"card.json lacks {', '.join(missing)}")
        labels = data["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise CardError("card.json 'labels' must be a non-empty list of strings")
        if len(set(labels)) != len(labels):
            raise CardError("card.json 'labels' has duplicates")
        sha = data["sha256"]
        if not isinstance(sha, str) or len(sha) != 64:
            raise CardError("card.json 'sha256' must be a 64-character hex digest")
        mpp = data.get("mpp")
        if mpp is not None and (not isinstance(mpp, (int, float)) or isinstance(mpp, bool) or not mpp > 0):
            raise CardError(f"card.json 'mpp' must be a positive number or null, got {mpp!r}")
        group = GroupSpec.from_dict(data)
        card = cls(
            name=_text(data, "name"), version=_text(data, "version"), task=_text(data, "task"),
            labels=tuple(labels), input=InputSpec.from_dict(data), group=group, sha256=sha.lower(),
            feature_dim=_feature_dim(data.get("outputs"), len(labels), group.order),
            mpp=float(mpp) if mpp is not None else None,
            **{k: _optional(data, k, kind) for k, kind in _OPTIONAL.items()},
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )
        if card.fp16_file is not None and (not isinstance(card.fp16_sha256, str) or len(card.fp16_sha256) != 64):
            raise CardError("card.json names an 'fp16_file' without its 64-character 'fp16_sha256'")
        return card


def read_card(folder: str | Path) -> ModelCard:
    """The validated card of a version folder (:data:`CARD_FILE` in it)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise CardError(f"{CARD_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{CARD_FILE} is not valid JSON: {exc}") from exc
    return ModelCard.from_dict(data)


# ---- validation helpers ----------------------------------------------------------------------
_REQUIRED = ("name", "version", "task", "labels", "input", "group", "sha256")
_OPTIONAL = {  # field -> accepted JSON type(s); None allowed for every one
    "architecture": dict, "training": dict, "metrics": dict, "opset": int, "exporter": str, "versions": dict,
    "export": dict, "files": dict, "fp16_file": str, "fp16_sha256": str, "command": str, "created": str,
}
_KNOWN = {f.name for f in dataclasses.fields(ModelCard)} | {"outputs", "patch_um"}  # both derived


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(data: dict, key: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        raise CardError(f"card.json '{key}' must be an object")
    return value


def _text(data: dict, key: str) -> str:
    value = data[key]
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value):
        raise CardError(f"card.json '{key}' must be a non-empty string, got {value!r}")
    return str(value)


def _optional(data: dict, key: str, kind: type) -> Any:
    value = data.get(key)
    if value is None:
        return {} if kind is dict else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CardError(f"card.json '{key}' must be {'an object' if kind is dict else kind.__name__} or null, got {value!r}")
    return value


def _positive_int(data: dict, key: str, where: str) -> int:
    value = data.get(key)
    if not _is_int(value) or value < 1:
        raise CardError(f"card.json '{where}.{key}' must be a positive integer, got {value!r}")
    return value


def _numbers(data: dict, key: str, channels: int) -> tuple[float, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or (value and len(value) != channels) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise CardError(f"card.json 'input.{key}' must list {channels} finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _elements(group: dict) -> tuple[GroupElement, ...]:
    raw = group.get("elements")
    if not isinstance(raw, list) or not raw:
        raise CardError("card.json 'group.elements' must be a non-empty list")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or "angle" not in e:
            raise CardError(f"group element {i} must be an object with an 'angle'")
        if e.get("index", i) != i:
            raise CardError(f"group element {i} has index {e.get('index')}: elements must be listed in axis order")
        angle = e["angle"]
        if not isinstance(angle, (int, float)) or isinstance(angle, bool) or not math.isfinite(angle):
            raise CardError(f"group element {i} has a non-numeric angle {angle!r}")
        out.append(GroupElement(i, float(angle), bool(e.get("reflection", False))))
    return tuple(out)


def _feature_dim(outputs: Any, k: int, g: int) -> int | None:
    """D of the FEATURES output; the other outputs, when listed, must agree with K and G."""
    if outputs is None:
        return None
    if not isinstance(outputs, dict):
        raise CardError("card.json 'outputs' must be an object")
    want = {LOGITS: ["N", k], PROBABILITIES: ["N", k], ORIENTATION_RESPONSES: ["N", k, g]}
    for name, shape in want.items():
        if name in outputs and outputs[name] != shape:
            raise CardError(f"card.json 'outputs.{name}' is {outputs[name]!r}, labels and group imply {shape}")
    feats = outputs.get(FEATURES)
    if feats is None:
        return None
    if not (isinstance(feats, list) and len(feats) == 3 and _is_int(feats[1]) and feats[1] > 0 and feats[2] == g):
        raise CardError(f"card.json 'outputs.{FEATURES}' must be ['N', D, {g}], got {feats!r}")
    return feats[1]
