"""The Open Inference Protocol, driven by the official ``tritonclient.http`` client against a real
uvicorn server on 127.0.0.1."""

from __future__ import annotations

import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import TINY

OUTPUTS = ("logits", "probabilities", "orientation_responses", "features")


@pytest.fixture(scope="module")
def triton(live_server):
    client = httpclient.InferenceServerClient(url=live_server.url.removeprefix("http://"))
    # the server is ready once every model's newest version is; older ones load after them: v1 follows
    deadline = time.monotonic() + 60
    while not client.is_model_ready(TINY, "1"):
        assert time.monotonic() < deadline, "version 1 never became ready"
        time.sleep(0.05)
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(model_repo):
    """The raw ONNX Runtime session on the same graph, to compare outputs with."""
    return ort.InferenceSession(str(model_repo / TINY / "2" / "model.onnx"), providers=["CPUExecutionProvider"])


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def _input(images: np.ndarray, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput("image", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=binary)
    return inp


def test_health_and_server_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "gsa-serve" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(triton):
    meta = triton.get_model_metadata(TINY)
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 16, 16, 1]}]
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
    assert meta["execution_providers"][0] in ort.get_available_providers()
    assert [e["angle"] for e in meta["group"]["elements"]] == [0.0, 90.0, 180.0, 270.0]
    assert triton.get_model_metadata(TINY, "1")["card"]["version"] == "1"
    assert triton.is_model_ready(TINY) and triton.is_model_ready(TINY, "1")
    assert not triton.is_model_ready("broken")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_the_raw_session(triton, reference, binary):
    images = _images(3)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = triton.infer(TINY, [_input(images, binary)], outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["model_version"] == "2" and response["id"] == "req-7"
    expected = dict(zip(OUTPUTS, reference.run(list(OUTPUTS), {"image": images})))
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == expected[name].shape
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)


def test_infer_version_subset_and_classification(triton):
    images = _images(2, seed=1)
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=3)]
    result = triton.infer(TINY, [_input(images, True)], model_version="1", outputs=outputs)
    assert result.get_response()["model_version"] == "1"
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    value, index, label = top[0, 0].decode().split(":")
    probs = triton.infer(TINY, [_input(images, True)], model_version="1").as_numpy("probabilities")
    assert int(index) == int(np.argmax(probs[0])) and label == index
    assert float(value) == pytest.approx(probs[0].max(), abs=1e-5)


def test_compressed_request(triton, reference):
    images = _images(2, seed=2)
    result = triton.infer(TINY, [_input(images, True)], request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("logits"), reference.run(["logits"], {"image": images})[0], rtol=1e-5, atol=1e-5)


def test_statistics_triton_shape(triton):
    triton.infer(TINY, [_input(_images(1), True)])
    stats = triton.get_inference_statistics(TINY, "2")["model_stats"]
    assert len(stats) == 1 and stats[0]["version"] == "2"
    s = stats[0]
    assert s["inference_count"] >= 1 and s["execution_count"] >= 1
    assert s["inference_stats"]["success"]["count"] >= 1 and s["inference_stats"]["compute_infer"]["ns"] > 0
    assert s["batch_stats"] and all(b["batch_size"] >= 1 for b in s["batch_stats"])
    assert {m["version"] for m in triton.get_inference_statistics(TINY)["model_stats"]} == {"1", "2"}


def test_repository_index_lists_the_broken_model_with_its_reason(triton):
    index = {(m["name"], m["version"]): m for m in triton.get_model_repository_index()}
    assert index[(TINY, "2")]["state"] == "READY"
    assert index[("broken", "1")]["state"] == "FAILED" and "sha256" in index[("broken", "1")]["reason"]


@pytest.mark.parametrize(
    "model, version, status, words",
    [("nope", "", "404", "unknown model 'nope'"), (TINY, "9", "404", "no version '9'"), ("broken", "", "400", "sha256")],
)
def test_infer_errors_unknown_or_broken_model(triton, model, version, status, words):
    with pytest.raises(InferenceServerException) as err:
        triton.infer(model, [_input(_images(1), True)], model_version=version)
    assert err.value.status() == status and words in err.value.message()


@pytest.mark.parametrize(
    "images, datatype, words",
    [
        (np.zeros((1, 15, 16, 1), np.uint8), "UINT8", "expects [-1, 16, 16, 1]"),
        (np.zeros((1, 16, 16, 3), np.uint8), "UINT8", "expects [-1, 16, 16, 1]"),
        (np.zeros((16, 16, 1), np.uint8), "UINT8", "expects [-1, 16, 16, 1]"),
        (np.zeros((1, 16, 16, 1), np.float32), "FP32", "expects UINT8"),
    ],
    ids=["height", "channels", "rank", "datatype"],
)
def test_infer_errors_wrong_tensor(triton, images, datatype, words):
    inp = httpclient.InferInput("image", list(images.shape), datatype)
    inp.set_data_from_numpy(images, binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        triton.infer(TINY, [inp])
    assert err.value.status() == "400" and words in err.value.message()
    assert triton.is_server_ready()


@pytest.mark.parametrize(
    "body, words",
    [
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [float("nan")] * 256}]}, "NaN or Inf"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [float("inf")] * 256}]}, "NaN or Inf"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [300] * 256}]}, "out of range"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [1.5] * 256}]}, "non-integers"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [1] * 255}]}, "255 values"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [[1, 2], [3]]}]}, "ragged"),
        ({"inputs": [{"name": "image", "datatype": "UINT9", "shape": [1], "data": [1]}]}, "unknown datatype"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [0] * 256}]}, "exactly one input 'image'"),
        ({"inputs": []}, "non-empty 'inputs'"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": [0] * 256}],
          "outputs": [{"name": "nope"}]}, "no output 'nope'"),
    ],
)
def test_malformed_json_tensors(live_server, body, words):
    import json

    raw = json.dumps(body)  # NaN and Infinity go out as the literals Python writes
    r = httpx.post(f"{live_server.url}/v2/models/{TINY}/infer", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize(
    "header, body, words",
    [
        ("abc", b"{}", "not an integer"),
        ("500", b"{}", "does not fit"),
        (None, b"{not json", "not valid JSON"),
    ],
)
def test_malformed_binary_requests(live_server, header, body, words):
    headers = {"Inference-Header-Content-Length": header} if header else {}
    r = httpx.post(f"{live_server.url}/v2/models/{TINY}/infer", content=body, headers=headers)
    assert r.status_code == 400 and words in r.json()["error"]


def test_binary_size_mismatch(live_server):
    import json

    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1],
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    r = httpx.post(f"{live_server.url}/v2/models/{TINY}/infer", content=header + bytes(200),
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "only 200 remain" in r.json()["error"]
    r = httpx.post(f"{live_server.url}/v2/models/{TINY}/infer", content=header + bytes(300),
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "declare 256" in r.json()["error"]
