"""Decoding uploaded images (PNG, JPEG, TIFF; 8-bit grey or RGB) into the model's uint8 NHWC
input, with every limit explicit: sizes are checked from the header before any pixel is decoded
(decompression bombs), and nothing is resized or colour-converted unless asked."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gsa_contract import ModelCard
from service.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType

__all__ = ["ImageLimits", "IMAGE_MEDIA_TYPES", "open_image", "load_pixels", "decode_image", "decode_for_model",
           "to_model_input", "to_model_channels"]

IMAGE_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/tiff": "TIFF"}
UPLOAD_FORMATS = ("PNG", "JPEG", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 4096 * 4096
    max_side: int = 8192


def open_image(source: bytes | Path, limits: ImageLimits, what: str = "image",
               formats: tuple[str, ...] = UPLOAD_FORMATS) -> Image.Image:
    """Open a PNG, JPEG or TIFF and check its size from the header, before any pixel is decoded
    (decompression bombs). Raises 415 for other formats, 413 over the limits, 422 for unreadable
    or multi-frame files. The one image decoder of the service: uploads, patch sets and plain
    images scored as slides all come through here."""
    if isinstance(source, bytes) and not source:
        raise Unprocessable(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limits decide, below
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"{what} is not a {', '.join(formats[:-1])} or {formats[-1]} image") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{what} is too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise Unprocessable(f"{what} cannot be read (a damaged or truncated file?): {exc}") from None
    width, height = img.size
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        img.close()
        raise PayloadTooLarge(
            f"{what} is {width}x{height}; the limits are {limits.max_side} pixels a side and "
            f"{limits.max_pixels} pixels in all"
        )
    try:
        frames = getattr(img, "n_frames", 1)  # a TIFF walks its directories: damage shows here
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        img.close()
        raise Unprocessable(f"{what} cannot be read (a damaged or truncated file?): {exc}") from None
    if frames > 1:
        img.close()
        raise Unprocessable(f"{what} has {frames} frames; send single-frame images")
    return img


def load_pixels(img: Image.Image, what: str = "image", convert_modes: bool = False) -> np.ndarray:
    """An opened image's pixels as ``[H, W, C]`` uint8 (C = 1 or 3). Pixel formats other than 8-bit
    grey (L) and RGB are refused (422), or converted to RGB with ``convert_modes``."""
    if img.mode not in ("L", "RGB") and not convert_modes:
        raise Unprocessable(f"{what} has pixel format {img.mode}; send 8-bit greyscale (L) or RGB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise Unprocessable(f"{what} could not be decoded (a damaged or truncated file?): {exc}") from None
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(source: bytes | Path, limits: ImageLimits, what: str = "image", convert_modes: bool = False,
                 formats: tuple[str, ...] = UPLOAD_FORMATS) -> np.ndarray:
    """Bytes or a file -> ``[H, W, C]`` uint8: :func:`open_image`, then :func:`load_pixels`."""
    with open_image(source, limits, what, formats) as img:
        return load_pixels(img, what, convert_modes)


def decode_for_model(source: bytes | Path, limits: ImageLimits, card: ModelCard, resize: bool = False,
                     convert: bool = False, what: str = "image") -> np.ndarray:
    """Bytes or a file -> the card's ``[height, width, channels]``. Without ``resize`` an image of
    another size is refused (422) from its header, before its pixels are decoded: a large image
    sent to a small model costs a header read, not a decode."""
    with open_image(source, limits, what) as img:
        if not resize and img.size != (card.width, card.height):
            _wrong_size(img.size, card, what)
        pixels = load_pixels(img, what, convert_modes=False)
    return to_model_input(pixels, card, resize, convert, what)


def _wrong_size(size: tuple[int, int], card: ModelCard, what: str) -> None:
    w, h = size
    raise Unprocessable(
        f"{what} is {w}x{h} but model '{card.name}' takes {card.width}x{card.height}; "
        f"send {card.width}x{card.height} images or pass resize=true"
    )


def to_model_input(
    pixels: np.ndarray, card: ModelCard, resize: bool = False, convert: bool = False, what: str = "image"
) -> np.ndarray:
    """``[H, W, C]`` -> the card's ``[height, width, channels]``. Greyscale is replicated to RGB
    (exact); RGB is turned grey only when its channels are equal or ``convert`` is asked; a wrong
    size is an error unless ``resize`` is asked (bilinear, aspect ratio not kept)."""
    h, w, _ = pixels.shape
    pixels = to_model_channels(pixels, card, convert, what)
    if (h, w) != (card.height, card.width):
        if not resize:
            _wrong_size((w, h), card, what)
        mode = "L" if pixels.shape[2] == 1 else "RGB"
        img = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels)
        pixels = np.asarray(img.resize((card.width, card.height), Image.Resampling.BILINEAR), dtype=np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return np.ascontiguousarray(pixels)


def to_model_channels(pixels: np.ndarray, card: ModelCard, convert: bool = False, what: str = "image") -> np.ndarray:
    """``[..., H, W, C]`` -> the card's channels, by the rules of :func:`to_model_input`: greyscale
    replicated to RGB; RGB made grey only when its channels are equal or ``convert`` is asked
    (Pillow's "L", ITU-R 601 luma), else 422."""
    c = pixels.shape[-1]
    if c == card.channels:
        return pixels
    if c == 1:
        return np.repeat(pixels, card.channels, axis=-1)
    if (pixels == pixels[..., :1]).all():
        return pixels[..., :1]
    if not convert:
        raise Unprocessable(f"{what} is RGB but model '{card.name}' takes greyscale; send greyscale or pass convert=true")
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    grey = np.stack([np.asarray(Image.fromarray(p).convert("L"), dtype=np.uint8) for p in flat])
    return grey.reshape(*pixels.shape[:-1], 1)
