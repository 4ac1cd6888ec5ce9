"""Model cards (``card.json``): parsed and checked once, so the rest of the service trusts them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CardError", "GroupElement", "ModelCard"]

_REQUIRED = ("name", "version", "task", "labels", "input", "group", "sha256")


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
class ModelCard:
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    height: int
    width: int
    channels: int
    group_name: str
    group_order: int
    elements: tuple[GroupElement, ...]
    sha256: str
    mpp: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    command: Any = None
    fp16_file: str | None = None
    fp16_sha256: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

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
        inp = _dict(data, "input")
        height, width, channels = (_positive_int(inp, k, "input") for k in ("height", "width", "channels"))
        if inp.get("dtype", "uint8") != "uint8" or inp.get("layout", "NHWC") != "NHWC":
            raise CardError(f"input must be uint8 NHWC, card says {inp.get('dtype')} {inp.get('layout')}")
        if channels not in (1, 3):
            raise CardError(f"input channels must be 1 or 3, card says {channels}")
        group = _dict(data, "group")
        elements = _elements(group)
        order = group.get("order", len(elements))
        if order != len(elements):
            raise CardError(f"group order {order} but {len(elements)} elements listed")
        sha = data["sha256"]
        if not isinstance(sha, str) or len(sha) != 64:
            raise CardError("card.json 'sha256' must be a 64-character hex digest")
        mpp = data.get("mpp")
        if mpp is not None and (not isinstance(mpp, (int, float)) or not mpp > 0):
            raise CardError(f"card.json 'mpp' must be a positive number or null, got {mpp!r}")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            task=str(data["task"]),
            labels=tuple(labels),
            height=height,
            width=width,
            channels=channels,
            group_name=str(group.get("name", "")),
            group_order=len(elements),
            elements=elements,
            sha256=sha.lower(),
            mpp=float(mpp) if mpp is not None else None,
            metrics=data.get("metrics") or {},
            opset=data.get("opset"),
            command=data.get("command"),
            fp16_file=data.get("fp16_file"),
            fp16_sha256=data.get("fp16_sha256"),
            raw=data,
        )


def _dict(data: dict, key: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        raise CardError(f"card.json '{key}' must be an object")
    return value


def _positive_int(data: dict, key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CardError(f"card.json '{where}.{key}' must be a positive integer, got {value!r}")
    return value


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
        if not isinstance(angle, (int, float)) or not math.isfinite(angle):
            raise CardError(f"group element {i} has a non-numeric angle {angle!r}")
        out.append(GroupElement(i, float(angle), bool(e.get("reflection", False))))
    return tuple(out)
