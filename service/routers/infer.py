"""Inference over the Open Inference Protocol: JSON tensors and the binary tensor data extension."""

from __future__ import annotations

import asyncio
import time
import zlib

import numpy as np
from fastapi import APIRouter, Request, Response

from gsa_contract import INPUT_NAME, ModelCard
from service.dependencies import LatestModelDep, ServerDep, SettingsDep, VersionModelDep
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.runtime import ModelServer, ServedModel
from service.schemas import ErrorResponse
from service.settings import Settings
from service.tensors import InferRequest, RequestedOutput, classify, encode_infer_response, parse_infer_request

router = APIRouter(prefix="/v2/models/{model_name}", tags=["inference"])

HEADER_LENGTH = "inference-header-content-length"
_PARSE_INLINE_BYTES = 64 * 1024  # bigger bodies are parsed in a thread, off the event loop
_DOC = {
    "responses": {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 429, 503)},
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description": "KServe v2 inference request"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "binary tensor data extension"}},
    }}},
}


@router.post("/infer", **_DOC)
async def infer(model: LatestModelDep, request: Request, server: ServerDep, settings: SettingsDep) -> Response:
    """Run the model's default version on a KServe v2 inference request."""
    return await _infer(request, server, settings, model)


@router.post("/versions/{version}/infer", **_DOC)
async def infer_version(model: VersionModelDep, request: Request, server: ServerDep, settings: SettingsDep) -> Response:
    """Run one model version on a KServe v2 inference request."""
    return await _infer(request, server, settings, model)


async def _infer(request: Request, server: ModelServer, settings: Settings, model: ServedModel) -> Response:
    started = time.perf_counter()  # the request timeout covers reading, parsing and queueing
    body = _decompress(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    if len(body) > _PARSE_INLINE_BYTES:
        req = await asyncio.to_thread(parse_infer_request, body, header_length)
    else:
        req = parse_infer_request(body, header_length)
    card = model.card
    images = _image_input(req, card, settings.max_images_per_request)
    outputs = await model.infer(images, started)
    selected = _select_outputs(req, outputs, card)
    content, json_length = encode_infer_response(model.name, model.version, req.id, selected)
    server.metrics.inference_requests.labels(model.name, model.version, "success").inc()
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)})


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    wbits = 31 if encoding == "gzip" else 15
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    return out


def _image_input(req: InferRequest, card: ModelCard, max_images: int) -> np.ndarray:
    names = [t.name for t in req.inputs]
    if names != [INPUT_NAME]:
        raise BadRequest(f"model '{card.name}' takes exactly one input '{INPUT_NAME}', got {names}")
    tensor = req.inputs[0]
    expected = [-1, card.height, card.width, card.channels]
    if tensor.datatype != "UINT8":
        raise BadRequest(f"input '{INPUT_NAME}' has datatype {tensor.datatype}; model '{card.name}' expects UINT8")
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected[1:]:
        raise BadRequest(f"input '{INPUT_NAME}' has shape {tensor.shape}; model '{card.name}' expects {expected} (NHWC)")
    n = tensor.shape[0]
    if n < 1:
        raise BadRequest(f"input '{INPUT_NAME}' holds no images")
    if n > max_images:
        raise PayloadTooLarge(f"input '{INPUT_NAME}' holds {n} images; the limit is {max_images} a request")
    assert tensor.array is not None
    return tensor.array


def _select_outputs(req: InferRequest, outputs: dict[str, np.ndarray], card: ModelCard) -> list[tuple[str, np.ndarray, bool]]:
    wanted = req.outputs if req.outputs is not None else [RequestedOutput(n, req.binary_output) for n in outputs]
    selected = []
    for out in wanted:
        if out.name not in outputs:
            raise BadRequest(f"model '{card.name}' has no output '{out.name}' (outputs: {', '.join(outputs)})")
        array = outputs[out.name]
        if out.classification:
            labels = list(card.labels) if array.ndim == 2 and array.shape[1] == card.num_classes else None
            array = classify(array, out.classification, labels)
        selected.append((out.name, array, out.binary))
    return selected
