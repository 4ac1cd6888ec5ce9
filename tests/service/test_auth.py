"""API keys: off on loopback by default, on when configured or bound elsewhere; 401 without or with
a wrong key, health and the page open, metrics configurable; keys never logged; tritonclient with
an Authorization header; the key CLI."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from conftest import TINY, LiveServer, make_settings
from service.auth import AuthConfigError, AuthMiddleware, auth_enabled, configure, hash_key, load_keys
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "gsa_test-key-0123456789"
OTHER = "gsa_other-key-9876543210"
KEYS = f"alice:{hash_key(KEY)},{OTHER}"  # one hashed entry, one plain key (hashed at load)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("host, mode, on", [
    ("127.0.0.1", "auto", False), ("::1", "auto", False), ("localhost", "auto", False),
    ("0.0.0.0", "auto", True), ("10.1.2.3", "auto", True), ("127.0.0.1", "on", True), ("0.0.0.0", "off", False),
])
def test_mode_follows_the_address_bound(host, mode, on):
    assert auth_enabled(Settings(host=host, auth=mode)) is on


def test_on_without_keys_refuses_to_start(model_repo):
    from service.app import create_app

    for settings in (Settings(auth="on"), Settings(host="0.0.0.0")):
        with pytest.raises(AuthConfigError, match="no API keys are configured"):
            create_app(make_settings(model_repo, **{k: getattr(settings, k) for k in ("auth", "host")}))


def test_keys_from_environment_and_file(monkeypatch, tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nbob:{hash_key('b0b')}\n\ncarol:{hash_key('c4r0l').upper()}\n")
    monkeypatch.setenv("GSA_API_KEYS", KEYS)
    monkeypatch.setenv("GSA_API_KEYS_FILE", str(path))
    monkeypatch.setenv("GSA_AUTH", "on")
    settings = Settings()
    assert KEY not in repr(settings) and OTHER not in repr(settings)  # a SecretStr
    keys = load_keys(settings)
    assert [k.name for k in keys] == ["alice", hash_key(OTHER)[:8], "bob", "carol"]
    middleware = AuthMiddleware(None, configure(settings))
    assert middleware.principal(f"Bearer {KEY}") == "alice"
    assert middleware.principal("bearer c4r0l") == "carol"
    assert middleware.principal(f"Bearer {OTHER}") == hash_key(OTHER)[:8]
    for header in (None, "", "Bearer", f"Basic {KEY}", f"Bearer {KEY}x", hash_key(KEY)):
        assert middleware.principal(header) is None
    path.write_text("dave:not-a-hash\n")  # plain keys are not allowed in the file: at rest they are hashes
    with pytest.raises(AuthConfigError, match="line 1"):
        load_keys(settings)


def test_off_on_loopback_by_default(app_client):
    c = app_client()
    r = c.post(f"/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert c.get("/v1/models").status_code == 200


def test_on_401_without_or_with_a_wrong_key_200_with_a_right_one(app_client):
    c = app_client(auth="on", api_keys=KEYS)
    url = f"/v1/models/{TINY}/predict"
    for headers in ({}, _bearer("wrong"), {"Authorization": KEY}):
        r = c.post(url, content=_png(), headers={"content-type": "image/png", **headers})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer") and "API key" in r.json()["error"]
        assert set(r.json()) == {"error"}
    for key in (KEY, OTHER):
        r = c.post(url, content=_png(), headers={"content-type": "image/png", **_bearer(key)})
        assert r.status_code == 200, r.text
    for path in ("/v1/models", f"/v2/models/{TINY}", "/v2", "/v1/jobs", "/openapi.json", "/docs"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers=_bearer(KEY)).status_code == 200, path
    # open: health, the page and its files, metrics by default
    for path in ("/v2/health/live", "/v2/health/ready", "/", "/metrics"):
        assert c.get(path).status_code == 200, path
    assert c.get("/static/does-not-exist.js").status_code == 404


def test_metrics_can_be_protected(app_client):
    c = app_client(auth="on", api_keys=KEYS, metrics_auth=True)
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers=_bearer(KEY)).status_code == 200
    assert c.get("/v2/health/ready").status_code == 200


def test_the_principal_is_the_keys_name():
    """``request.state.principal``: the key's name with auth on, None with auth off."""
    from fastapi.testclient import TestClient

    inner = FastAPI()

    @inner.get("/whoami")
    async def whoami(request: Request) -> dict:
        return {"principal": request.state.principal}

    on = TestClient(AuthMiddleware(inner, configure(Settings(auth="on", api_keys=KEYS))))
    assert on.get("/whoami", headers=_bearer(KEY)).json() == {"principal": "alice"}
    assert on.get("/whoami", headers=_bearer(OTHER)).json() == {"principal": hash_key(OTHER)[:8]}
    assert on.get("/whoami").status_code == 401
    off = TestClient(AuthMiddleware(inner, configure(Settings(auth="auto"))))
    assert off.get("/whoami").json() == {"principal": None}


def test_keys_are_never_logged(app_client):
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    from service.logs import JsonFormatter

    handler.emit = lambda record: records.append(JsonFormatter().format(record))
    logging.getLogger("service").addHandler(handler)
    try:
        c = app_client(auth="on", api_keys=KEYS, access_log=True, log_level="DEBUG")
        c.get("/v1/models", headers=_bearer(KEY))
        c.get("/v1/models", headers=_bearer(KEY + "-wrong"))
        c.post("/v1/models/nope/predict", content=b"x", headers={"content-type": "image/png", **_bearer(OTHER)})
    finally:
        logging.getLogger("service").removeHandler(handler)
    text = "\n".join(records)
    assert records and "401" in text
    assert KEY not in text and OTHER not in text and hash_key(KEY) not in text


def test_tritonclient_with_an_authorization_header(model_repo):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with LiveServer(make_settings(model_repo, auth="on", api_keys=KEYS)) as server:
        client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            images = np.zeros((2, 16, 16, 1), np.uint8)
            inp = httpclient.InferInput("image", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images, binary_data=True)
            assert client.is_server_ready()  # health is open
            with pytest.raises(InferenceServerException, match="API key"):
                client.infer(TINY, [inp])
            result = client.infer(TINY, [inp], headers=_bearer(KEY))
            assert result.as_numpy("probabilities").shape == (2, 10)
            assert client.get_model_metadata(TINY, headers=_bearer(KEY))["name"] == TINY
        finally:
            client.close()


def test_key_cli(tmp_path):
    env = {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "service.auth", "new", "ci-bot"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=60, check=True).stdout.splitlines()
    key, line = out[0].removeprefix("key:  "), out[1].removeprefix("line: ")
    assert line == f"ci-bot:{hash_key(key)}" and len(key) > 40
    hashed = subprocess.run([sys.executable, "-m", "service.auth", "hash", "--name", "x"], input=key + "\n",
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=True).stdout.strip()
    assert hashed == f"x:{hash_key(key)}"
    (tmp_path / "keys").write_text(line + "\n")
    keys = load_keys(Settings(api_keys_file=tmp_path / "keys"))
    assert AuthMiddleware(None, keys).principal(f"Bearer {key}") == "ci-bot"
    assert json.dumps([k.name for k in keys]) == '["ci-bot"]'
