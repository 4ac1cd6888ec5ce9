"""Image endpoints over HTTP: raw, multipart and base64 bodies; PNG, JPEG and TIFF; sizes; and the
orientation responses following a rotation of the picture."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from service.schemas import PredictResponse


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _digit(seed: int = 0, size: int = 16) -> np.ndarray:
    """A blob with no rotational symmetry, so that rotations change the picture."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.uint8)
    img[3:12, 5:8] = 255
    img[3:6, 5:12] = 200
    return np.clip(img.astype(int) + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def client(model_repo):
    from fastapi.testclient import TestClient

    from conftest import make_settings, wait_ready
    from service.app import create_app

    with TestClient(create_app(make_settings(model_repo, max_image_side=64, max_image_pixels=64 * 64))) as c:
        wait_ready(c.get)
        yield c


def _check_prediction(p: dict) -> None:
    labels = [str(i) for i in range(10)]
    assert list(p["probabilities"]) == labels
    assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert [e["angle"] for e in p["orientation"]["elements"]] == [0.0, 90.0, 180.0, 270.0]
    assert all(len(row) == 4 for row in p["orientation"]["responses"].values())
    top_row = p["orientation"]["responses"][p["label"]]
    assert p["dominant_orientation"] == 90.0 * int(np.argmax(top_row))
    assert p["dominant_element"]["angle"] == p["dominant_orientation"]


@pytest.mark.parametrize("fmt, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("TIFF", "image/tiff")])
def test_raw_body_each_format(client, fmt, media_type):
    r = client.post(f"/v1/models/{TINY}/predict", content=_encode(_digit(), fmt), headers={"content-type": media_type})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == TINY and body["model_version"] == "2" and len(body["predictions"]) == 1
    PredictResponse.model_validate(body)  # the documented schema
    _check_prediction(body["predictions"][0])


def test_multipart_several_files_and_version(client):
    files = [("files", (f"d{i}.png", _encode(_digit(i)), "image/png")) for i in range(3)]
    r = client.post(f"/v1/models/{TINY}/versions/1/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1"
    assert [p["filename"] for p in body["predictions"]] == ["d0.png", "d1.png", "d2.png"]
    for p in body["predictions"]:
        _check_prediction(p)


def test_base64_json_matches_raw(client):
    png = _encode(_digit(5))
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    r = client.post(f"/v1/models/{TINY}/predict", json={"images": [base64.b64encode(png).decode(), data_url]})
    assert r.status_code == 200, r.text
    a, b = r.json()["predictions"]
    raw = client.post(f"/v1/models/{TINY}/predict", content=png, headers={"content-type": "image/png"}).json()["predictions"][0]
    assert a["probabilities"] == pytest.approx(raw["probabilities"], abs=1e-6)
    assert b["probabilities"] == a["probabilities"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotating_the_image_shifts_the_orientation_responses(client, k):
    """R4 equivariance through the whole service: rotating the picture by k quarter turns
    (counter-clockwise, element k of the group) rolls every class's responses by k elements and
    leaves the probabilities unchanged."""
    img = _digit(3)
    files = [("files", ("a.png", _encode(img), "image/png")), ("files", ("b.png", _encode(np.rot90(img, k).copy()), "image/png"))]
    r = client.post(f"/v1/models/{TINY}/predict", files=files)
    assert r.status_code == 200, r.text
    up, turned = r.json()["predictions"]
    for label, row in up["orientation"]["responses"].items():
        np.testing.assert_allclose(turned["orientation"]["responses"][label], np.roll(row, k), rtol=1e-4, atol=1e-3)
    # the shift is visible: the responses are not invariant under it (else the test proves nothing)
    assert any(not np.allclose(row, np.roll(row, k), rtol=1e-3, atol=1e-2) for row in up["orientation"]["responses"].values())
    assert turned["probabilities"] == pytest.approx(up["probabilities"], abs=1e-4)
    assert turned["label"] == up["label"]
    assert turned["dominant_orientation"] == (up["dominant_orientation"] + 90 * k) % 360


def test_wrong_size_is_refused_unless_resize(client):
    big = _encode(_digit(size=24))
    r = client.post(f"/v1/models/{TINY}/predict", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 422
    assert "24x24" in r.json()["error"] and "16x16" in r.json()["error"] and "resize=true" in r.json()["error"]
    r = client.post(f"/v1/models/{TINY}/predict?resize=true", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text


def test_rgb_for_a_greyscale_model(client):
    colour = np.stack([_digit(1), _digit(2), _digit(3)], axis=-1)
    r = client.post(f"/v1/models/{TINY}/predict", content=_encode(colour), headers={"content-type": "image/png"})
    assert r.status_code == 422 and "greyscale" in r.json()["error"]
    r = client.post(f"/v1/models/{TINY}/predict?convert=true", content=_encode(colour), headers={"content-type": "image/png"})
    assert r.status_code == 200
    grey_as_rgb = np.repeat(_digit(1)[:, :, None], 3, axis=-1)  # equal channels: taken as greyscale
    a = client.post(f"/v1/models/{TINY}/predict", content=_encode(grey_as_rgb), headers={"content-type": "image/png"})
    b = client.post(f"/v1/models/{TINY}/predict", content=_encode(_digit(1)), headers={"content-type": "image/png"})
    assert a.json()["predictions"][0]["probabilities"] == pytest.approx(b.json()["predictions"][0]["probabilities"])


@pytest.mark.parametrize(
    "content, media_type, status, words",
    [
        (b"GIF89a....", "image/gif", 415, "unsupported content type"),
        (b"not an image at all", "image/png", 415, "not a PNG, JPEG or TIFF"),
        (b"", "image/png", 422, "empty"),
        (b'{"images": ["***"]}', "application/json", 400, "not valid base64"),
        (b'{"pictures": []}', "application/json", 400, "images"),
        (b"{", "application/json", 400, "not valid JSON"),
    ],
)
def test_bad_images(client, content, media_type, status, words):
    r = client.post(f"/v1/models/{TINY}/predict", content=content, headers={"content-type": media_type})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_unsupported_pixel_formats(client):
    rgba = np.zeros((16, 16, 4), np.uint8)
    r = client.post(f"/v1/models/{TINY}/predict", content=_encode(rgba), headers={"content-type": "image/png"})
    assert r.status_code == 422 and "RGBA" in r.json()["error"]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(buf, format="PNG")
    r = client.post(f"/v1/models/{TINY}/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 422 and "8-bit" in r.json()["error"]


def test_image_dimension_limits_before_decoding(client):
    # 65x65 is over max_image_side=64; 64x64 would pass the side limit and the pixel limit.
    r = client.post(f"/v1/models/{TINY}/predict?resize=true", content=_encode(np.zeros((65, 65), np.uint8)), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "65x65" in r.json()["error"]
    r = client.post(f"/v1/models/{TINY}/predict?resize=true", content=_encode(np.zeros((64, 64), np.uint8)), headers={"content-type": "image/png"})
    assert r.status_code == 200


def test_wrong_size_is_refused_from_the_header_before_decoding(model_repo, app_client, monkeypatch):
    """A 4096x4096 PNG (within the pixel limits) for the 16x16 model: 422 from its header, its
    pixels never decoded; with resize=true the same image is decoded."""
    import service.images

    decoded = []
    real = service.images.load_pixels

    def counting(img, *args, **kwargs):
        decoded.append(img.size)
        return real(img, *args, **kwargs)

    monkeypatch.setattr(service.images, "load_pixels", counting)
    c = app_client(max_image_side=4096, max_image_pixels=4096 * 4096)
    big = _encode(np.zeros((4096, 4096), np.uint8))
    r = c.post(f"/v1/models/{TINY}/predict", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "4096x4096" in r.json()["error"] and "resize=true" in r.json()["error"]
    assert decoded == []
    r = c.post(f"/v1/models/{TINY}/predict", content=_encode(_digit()), headers={"content-type": "image/png"})
    assert r.status_code == 200 and decoded == [(16, 16)]
    r = c.post(f"/v1/models/{TINY}/predict?resize=true", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 200 and decoded[-1] == (4096, 4096)


def test_decompression_bomb(client):
    """A 20000x20000 PNG of zeros compresses to a few hundred kB; it must be refused from its
    header, without allocating 400 MB."""
    import struct
    import zlib

    width = height = 20000
    row = b"\x00" + bytes(width)
    raw = zlib.compress(row * 64, 9)  # only the first rows: the header is what matters
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    r = client.post(f"/v1/models/{TINY}/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "400000000 pixels" in r.json()["error"]


def test_too_many_images(model_repo, app_client):
    c = app_client(max_images_per_request=2)
    files = [("files", (f"{i}.png", _encode(_digit(i)), "image/png")) for i in range(3)]
    r = c.post(f"/v1/models/{TINY}/predict", files=files)
    assert r.status_code == 413 and "limit is 2" in r.json()["error"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_features_follow_the_rotation(client, k):
    """``?features=true``: the per-element features [D, |H|] of a quarter-turned image are the
    upright image's with the group axis rolled by k, and their mean over the axis is invariant."""
    img = _digit(5)
    files = [("files", ("a.png", _encode(img), "image/png")), ("files", ("b.png", _encode(np.rot90(img, k).copy()), "image/png"))]
    r = client.post(f"/v1/models/{TINY}/predict?features=true", files=files)
    assert r.status_code == 200, r.text
    up, turned = (p["features"] for p in r.json()["predictions"])
    per_up, per_turned = np.array(up["per_element"]), np.array(turned["per_element"])
    assert per_up.shape[1] == 4 and per_up.shape == per_turned.shape
    np.testing.assert_allclose(per_turned, np.roll(per_up, k, axis=1), rtol=1e-4, atol=1e-4)
    assert not np.allclose(per_up, np.roll(per_up, k, axis=1), atol=1e-3)  # the roll is visible
    np.testing.assert_allclose(up["invariant"], per_up.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(turned["invariant"], up["invariant"], rtol=1e-4, atol=1e-4)
    plain = client.post(f"/v1/models/{TINY}/predict", content=_encode(img), headers={"content-type": "image/png"})
    assert "features" not in plain.json()["predictions"][0] or plain.json()["predictions"][0]["features"] is None


def test_features_of_a_model_exported_without_them(app_client, tmp_path):
    """The committed RotMNIST graphs have no features output: asking for them is a 400 that says so."""
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "models" / "rotmnist-z2" / "3"
    shutil.copytree(src, tmp_path / "rotmnist-z2" / "3")
    c = app_client(model_dir=tmp_path)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    r = c.post("/v1/models/rotmnist-z2/predict?features=true", content=_encode(digit), headers={"content-type": "image/png"})
    assert r.status_code == 400 and "without features" in r.json()["error"], r.text
    r = c.post("/v1/models/rotmnist-z2/predict", content=_encode(digit), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
