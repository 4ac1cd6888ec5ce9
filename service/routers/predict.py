"""Image endpoints for people: PNG, JPEG or TIFF in (raw, multipart or base64 JSON), labels,
probabilities and orientation responses out."""

from __future__ import annotations

import asyncio
import time
import base64
import binascii
import json

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from gsa_contract import FEATURES, ModelCard
from service.dependencies import LatestModelDep, ServerDep, SettingsDep, VersionModelDep
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.images import IMAGE_MEDIA_TYPES, ImageLimits, decode_for_model
from service.runtime import ModelServer, ServedModel
from service.schemas import Base64Images, ErrorResponse, PredictResponse
from service.settings import Settings

router = APIRouter(prefix="/v1/models/{model_name}", tags=["images"])

_IMAGE_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
_DOC = {
    "response_model": PredictResponse,
    "responses": {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 429, 503)},
    "openapi_extra": {"requestBody": {"required": True, "content": {
        **{t: _IMAGE_SCHEMA for t in ("image/png", "image/jpeg", "image/tiff")},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": Base64Images.model_json_schema()},
    }}},
}
_DECODE_INLINE_BYTES = 256 * 1024  # larger uploads are decoded in a thread, off the event loop
ResizeQuery = Query(False, description="resize images of another size to the model's input (bilinear)")
ConvertQuery = Query(False, description="convert RGB to greyscale for greyscale models")
FeaturesQuery = Query(False, description="also return the per-orientation features [D, |H|] and their invariant mean [D] "
                                         "(models exported with features)")


@router.post("/predict", **_DOC)
async def predict(
    model: LatestModelDep, request: Request, server: ServerDep, settings: SettingsDep,
    resize: bool = ResizeQuery, convert: bool = ConvertQuery, features: bool = FeaturesQuery,
) -> JSONResponse:
    """Classify one or many images with the model's default version."""
    return await _predict(request, server, settings, model, resize, convert, features)


@router.post("/versions/{version}/predict", **_DOC)
async def predict_version(
    model: VersionModelDep, request: Request, server: ServerDep, settings: SettingsDep,
    resize: bool = ResizeQuery, convert: bool = ConvertQuery, features: bool = FeaturesQuery,
) -> JSONResponse:
    """Classify one or many images with one model version."""
    return await _predict(request, server, settings, model, resize, convert, features)


async def _predict(
    request: Request, server: ModelServer, settings: Settings, model: ServedModel, resize: bool, convert: bool,
    features: bool = False,
) -> JSONResponse:
    started = time.perf_counter()  # the request timeout covers reading, decoding and queueing
    card = model.card
    if features and card.feature_dim is None:
        raise BadRequest(f"model '{card.name}' version '{card.version}' was exported without features; "
                         "export it with --features or leave features out")
    uploads = await _read_images(request, settings)
    limits = ImageLimits(settings.max_image_pixels, settings.max_image_side)

    def prepare() -> np.ndarray:
        return np.stack([
            decode_for_model(data, limits, card, resize, convert, what)
            for what, data in ((_describe(i, name), data) for i, (name, data) in enumerate(uploads))
        ])

    if sum(len(data) for _, data in uploads) > _DECODE_INLINE_BYTES:
        images = await asyncio.to_thread(prepare)
    else:
        images = prepare()  # small images decode faster than a hop to a thread
    outputs = await model.infer(images, started)
    server.metrics.inference_requests.labels(model.name, model.version, "success").inc()
    # built as plain JSON: the response model documents it, re-validating every number would only cost time
    return JSONResponse({
        "model_name": model.name, "model_version": model.version,
        "predictions": [_prediction(i, name, card, outputs, features) for i, (name, _) in enumerate(uploads)],
    })


def _describe(index: int, name: str | None) -> str:
    return f"image {index}" + (f" ({name})" if name else "")


async def _read_images(request: Request, settings: Settings) -> list[tuple[str | None, bytes]]:
    """``(filename, bytes)`` of every image in the body, whichever of the three forms it takes."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_images_per_request
    if media_type in IMAGE_MEDIA_TYPES or media_type == "application/octet-stream":
        images = [(None, await request.body())]
    elif media_type == "multipart/form-data":
        form = await request.form(max_files=limit + 1, max_fields=limit + 1, max_part_size=settings.max_body_bytes)
        images = [(f.filename, await f.read()) for _, f in form.multi_items() if isinstance(f, UploadFile)]
        await form.close()
    elif media_type == "application/json":
        images = _base64_images(await request.body())
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {media_type or '(none)'!r}: send an image (image/png, image/jpeg, "
            "image/tiff), multipart/form-data with image files, or JSON with base64 images"
        )
    if not images:
        raise BadRequest("the request holds no images")
    if len(images) > limit:
        raise PayloadTooLarge(f"the request holds {len(images)} images; the limit is {limit}")
    return images


def _base64_images(body: bytes) -> list[tuple[str | None, bytes]]:
    try:
        doc = Base64Images.model_validate(json.loads(body))
    except ValidationError as exc:  # a ValueError too: caught first
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadRequest(f"request body does not match {{\"images\": [base64, ...]}}: {problems}") from None
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for a body that is not UTF-8
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    names = doc.filenames or [None] * len(doc.images)
    if len(names) != len(doc.images):
        raise BadRequest(f"{len(names)} filenames for {len(doc.images)} images")
    out = []
    for i, text in enumerate(doc.images):
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            out.append((names[i], base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{i}] is not valid base64") from None
    return out


def _prediction(i: int, name: str | None, card: ModelCard, outputs: dict[str, np.ndarray], features: bool = False) -> dict:
    """One image's answer, shaped as :class:`ImagePrediction`."""
    probs = outputs["probabilities"][i].tolist()
    responses = outputs["orientation_responses"][i]  # K, G
    top = int(np.argmax(probs))
    g = int(np.argmax(responses[top]))
    elements = [e.as_dict() for e in card.elements]
    return {
        "index": i,
        "filename": name,
        "label": card.labels[top],
        "score": probs[top],
        "probabilities": dict(zip(card.labels, probs)),
        "orientation": {
            "group": card.group_name,
            "elements": elements,
            "responses": dict(zip(card.labels, responses.tolist())),
        },
        "dominant_orientation": card.elements[g].angle,
        "dominant_element": elements[g],
        **({"features": _features(outputs[FEATURES][i])} if features else {}),
    }


def _features(per_element: np.ndarray) -> dict:
    """``[D, G]`` features of one image and their mean over the group axis (invariant)."""
    return {"invariant": per_element.mean(axis=1).tolist(), "per_element": per_element.tolist()}
