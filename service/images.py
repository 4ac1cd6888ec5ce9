"""Decoding uploaded images (PNG, JPEG, TIFF; 8-bit grey or RGB) into the model's uint8 NHWC
input, with every limit explicit: sizes are checked from the header before any pixel is decoded
(decompression bombs), and nothing is resized or colour-converted unless asked."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.card import ModelCard
from service.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType

__all__ = ["ImageLimits", "IMAGE_MEDIA_TYPES", "decode_image", "to_model_input"]

IMAGE_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/tiff": "TIFF"}
_FORMATS = ("PNG", "JPEG", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_side: int


def decode_image(data: bytes, limits: ImageLimits, what: str = "image") -> np.ndarray:
    """Bytes -> ``[H, W, C]`` uint8 (C = 1 or 3). Raises 415 for other formats, 413 for images over
    the limits (before decoding their pixels), 422 for other pixel formats."""
    if not data:
        raise Unprocessable(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"{what} is not a PNG, JPEG or TIFF image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{what} is too large to decode: {exc}") from None
    with img:
        width, height = img.size
        if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
            raise PayloadTooLarge(
                f"{what} is {width}x{height}; the limits are {limits.max_side} pixels a side and "
                f"{limits.max_pixels} pixels in all"
            )
        if getattr(img, "n_frames", 1) > 1:
            raise Unprocessable(f"{what} has {img.n_frames} frames; send single-frame images")
        if img.mode not in ("L", "RGB"):
            raise Unprocessable(f"{what} has pixel format {img.mode}; send 8-bit greyscale (L) or RGB")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise Unprocessable(f"{what} could not be decoded: {exc}") from None
        array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def to_model_input(
    pixels: np.ndarray, card: ModelCard, resize: bool = False, convert: bool = False, what: str = "image"
) -> np.ndarray:
    """``[H, W, C]`` -> the card's ``[height, width, channels]``. Greyscale is replicated to RGB
    (exact); RGB is turned grey only when its channels are equal or ``convert`` is asked; a wrong
    size is an error unless ``resize`` is asked (bilinear, aspect ratio not kept)."""
    h, w, c = pixels.shape
    if c != card.channels:
        if c == 1:
            pixels = np.repeat(pixels, card.channels, axis=2)
        elif (pixels == pixels[:, :, :1]).all():
            pixels = pixels[:, :, :1]
        elif convert:
            pixels = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.uint8)[:, :, None]
        else:
            raise Unprocessable(
                f"{what} is RGB but model '{card.name}' takes greyscale; send greyscale or pass convert=true"
            )
    if (h, w) != (card.height, card.width):
        if not resize:
            raise Unprocessable(
                f"{what} is {w}x{h} but model '{card.name}' takes {card.width}x{card.height}; "
                f"send {card.width}x{card.height} images or pass resize=true"
            )
        mode = "L" if pixels.shape[2] == 1 else "RGB"
        img = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels)
        pixels = np.asarray(img.resize((card.width, card.height), Image.Resampling.BILINEAR), dtype=np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return np.ascontiguousarray(pixels)
