"""Image decoding and conversion to the model input, without a server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gsa_contract import ModelCard
from service.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType
from service.images import ImageLimits, decode_image, to_model_input

LIMITS = ImageLimits(max_pixels=10_000, max_side=200)


def _card(channels: int, size: int = 8) -> ModelCard:
    return ModelCard.from_dict({
        "name": "m", "version": "1", "task": "classification", "labels": ["a", "b"], "sha256": "0" * 64,
        "input": {"height": size, "width": size, "channels": channels, "dtype": "uint8", "layout": "NHWC"},
        "group": {"name": "R4", "order": 4, "elements": [{"index": i, "angle": 90.0 * i, "reflection": False} for i in range(4)]},
    })


def _encode(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_lossless_formats_decode_exactly(fmt):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_encode(pixels, fmt), LIMITS), pixels)
    grey = pixels[:, :, 0].copy()
    np.testing.assert_array_equal(decode_image(_encode(grey, fmt), LIMITS), grey[:, :, None])


def test_compressed_tiff():
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_encode(pixels, "TIFF", compression="tiff_lzw"), LIMITS)[:, :, 0], pixels)


def test_grey_image_for_an_rgb_model_is_replicated():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    out = to_model_input(grey, _card(3))
    assert out.shape == (8, 8, 3) and (out == grey).all()


def test_resize_rgb_only_when_asked():
    rgb = np.random.default_rng(2).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    with pytest.raises(Unprocessable, match="10x12"):
        to_model_input(rgb, _card(3))
    assert to_model_input(rgb, _card(3), resize=True).shape == (8, 8, 3)


def test_limits_and_formats():
    with pytest.raises(PayloadTooLarge, match="201x1"):
        decode_image(_encode(np.zeros((1, 201), np.uint8)), LIMITS)
    with pytest.raises(PayloadTooLarge, match="150x150"):
        decode_image(_encode(np.zeros((150, 150), np.uint8)), LIMITS)
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="GIF")
    with pytest.raises(UnsupportedMediaType):
        decode_image(buf.getvalue(), LIMITS)  # a real image, but not an accepted format
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(Unprocessable, match="2 frames"):
        decode_image(buf.getvalue(), LIMITS)
    truncated = _encode(np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8))[:200]
    with pytest.raises(Unprocessable, match="could not be decoded"):
        decode_image(truncated, LIMITS)
