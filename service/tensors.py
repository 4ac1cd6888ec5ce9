"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

A binary request is ``<JSON header><binary data>`` with the header's length in the
``Inference-Header-Content-Length`` HTTP header; each input whose ``parameters.binary_data_size``
is set takes that many bytes of the tail, in order. Responses mirror it for outputs that ask for
``binary_data`` (or all of them with the request parameter ``binary_data_output``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BadRequest

__all__ = ["DATATYPES", "InputTensor", "RequestedOutput", "InferRequest", "parse_infer_request", "encode_infer_response"]

DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_NP_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items() if k != "BYTES"}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None  # None for BYTES (never a valid model input here)


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-k classification extension; 0: the raw tensor


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool
    parameters: dict = field(default_factory=dict)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a JSON or binary-extension infer request; every malformed part is a BadRequest."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length is not an integer: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        header, tail = body[:n], memoryview(body)[n:]
    else:
        header, tail = body, memoryview(b"")
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    params = _object(doc.get("parameters", {}), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request needs a non-empty 'inputs' list")
    inputs, offset = [], 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _parse_input(raw, i, tail[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(tail):
        raise BadRequest(f"binary data holds {len(tail)} bytes but the inputs declare {offset}")
    binary_output = _flag(params.get("binary_data_output", False), "parameters.binary_data_output")
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = [_parse_output(o, binary_output) for o in doc["outputs"]]
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    return InferRequest(request_id, inputs, outputs, binary_output, params)


def _parse_input(raw: Any, i: int, tail: memoryview) -> tuple[InputTensor, int]:
    raw = _object(raw, f"inputs[{i}]")
    name = raw.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"inputs[{i}] needs a string 'name'")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(f"input '{name}' has unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input '{name}' needs a 'shape' of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    params = _object(raw.get("parameters", {}), f"input '{name}' parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input '{name}' binary_data_size must be a non-negative integer")
        if size > len(tail):
            raise BadRequest(f"input '{name}' declares {size} bytes of binary data, only {len(tail)} remain")
        if datatype == "BYTES":
            return InputTensor(name, datatype, shape, None), size
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        if size != count * dtype.itemsize:
            raise BadRequest(
                f"input '{name}' has {size} bytes of binary data; shape {shape} of {datatype} needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(tail[:size], dtype=dtype).reshape(shape)
        return InputTensor(name, datatype, shape, array), size
    if "data" not in raw:
        raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    return InputTensor(name, datatype, shape, _json_data(raw["data"], name, datatype, shape, count)), 0


def _json_data(data: Any, name: str, datatype: str, shape: list[int], count: int) -> np.ndarray | None:
    if datatype == "BYTES":
        return None
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise BadRequest(f"input '{name}' data is ragged or malformed") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise BadRequest(f"input '{name}' data must hold only numbers")
    if array.size != count:
        raise BadRequest(f"input '{name}' has {array.size} values, shape {shape} needs {count}")
    kind = np.dtype(DATATYPES[datatype]).kind
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"input '{name}' data contains NaN or Inf")
    if kind in "iu":
        if array.dtype.kind == "b" or (array.dtype.kind == "f" and array.size and not (array == np.round(array)).all()):
            raise BadRequest(f"input '{name}' is {datatype} but its data holds non-integers")
        info = np.iinfo(DATATYPES[datatype])
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise BadRequest(f"input '{name}' data is out of range for {datatype} [{info.min}, {info.max}]")
    elif kind == "b" and array.dtype.kind != "b":
        raise BadRequest(f"input '{name}' is BOOL but its data holds non-booleans")
    return array.astype(DATATYPES[datatype]).reshape(shape)


def _parse_output(raw: Any, binary_default: bool) -> RequestedOutput:
    raw = _object(raw, "outputs[]")
    name = raw.get("name")
    if not isinstance(name, str):
        raise BadRequest("each requested output needs a string 'name'")
    params = _object(raw.get("parameters", {}), f"output '{name}' parameters")
    binary = _flag(params.get("binary_data", binary_default), f"output '{name}' binary_data")
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise BadRequest(f"output '{name}' classification must be a non-negative integer")
    return RequestedOutput(name, binary, k)


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false")
    return value


# ---- responses ------------------------------------------------------------------------------
def classify(values: np.ndarray, k: int, labels: list[str] | None) -> np.ndarray:
    """Classification extension: top ``k`` along the last axis as ``b"value:index[:label]"``."""
    k = min(k, values.shape[-1])
    top = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    out = np.empty(top.shape, dtype=object)
    for idx in np.ndindex(top.shape):
        c = int(top[idx])
        v = float(values[idx[:-1] + (c,)])
        label = f":{labels[c]}" if labels and c < len(labels) else ""
        out[idx] = f"{v:f}:{c}{label}".encode()
    return out


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, int | None]:
    """Body and, when any output is binary, the JSON header's length."""
    entries, blobs = [], []
    for name, array, binary in outputs:
        datatype = "BYTES" if array.dtype == object else _NP_TO_DATATYPE[array.dtype]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = _bytes_blob(array) if datatype == "BYTES" else np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [b.decode() for b in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _bytes_blob(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in array.reshape(-1))
