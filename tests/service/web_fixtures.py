"""Fixtures for the web page tests: the real server (``python -m service`` on 127.0.0.1) with the
committed RotMNIST R4 model and the scoring tests' RGB pathology model, and headless Chromium
(Debian's ``chromium`` and ``chromium-driver`` through selenium; no browser is ever downloaded).

Imported by ``test_web_page.py``. Without the browser the browser tests skip, except under CI
(``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from data_paths import SLIDE, data_path
from scoring_fixtures import PATH_MODEL

ROOT = Path(__file__).resolve().parents[2]
R4 = "rotmnist-r4"  # committed in models/: 28x28 greyscale digits, group R4
PCAM_R4M = "pcam-r4m"  # committed in models/: 96x96 H&E patches at 0.972 um/px, group R4M (D4)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WINDOW = (1366, 900)  # a laptop screen


def missing(what: str) -> None:
    """Fail under CI, where the browser must be installed (.ci/run does it); skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(f"{what}: apt-get install chromium chromium-driver; pip install selenium (dev extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def web_repo(tmp_path_factory, path_model_repo) -> Path:
    """rotmnist-r4 and pcam-r4m (committed) and path_r4 (exported by the scoring tests' fixture) in
    one repository."""
    root = tmp_path_factory.mktemp("web_models")
    for name in (R4, PCAM_R4M):
        shutil.copytree(ROOT / "models" / name, root / name)
    shutil.copytree(path_model_repo / PATH_MODEL, root / PATH_MODEL)
    return root


def _serve(web_repo: Path, slide: Path, tmp: Path, **extra_env: str):
    """``python -m service`` on a free port of 127.0.0.1, with a jobs and a data directory (the
    synthetic slide, and the real one as ``real.svs`` where the data folder has it); yields its URL."""
    (tmp / "data").mkdir()
    shutil.copy(slide, tmp / "data" / "synthetic.tiff")
    if data_path(SLIDE).is_file():
        shutil.copy(data_path(SLIDE), tmp / "data" / "real.svs")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSA_")}
    env.update(GSA_MODEL_DIR=str(web_repo), GSA_HOST="127.0.0.1", GSA_PORT=str(port), GSA_JOBS_DIR=str(tmp / "jobs"),
               GSA_DATA_DIR=str(tmp / "data"), GSA_INTRA_OP_THREADS="1", GSA_WARMUP="false",
               GSA_BATCHING__MAX_BATCH_SIZE="8", GSA_LOG_LEVEL="WARNING", GSA_ACCESS_LOG="false", **extra_env)
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(web_repo, synthetic_slides, tmp_path_factory) -> str:
    """The server with authentication off (loopback)."""
    yield from _serve(web_repo, synthetic_slides["slide"], tmp_path_factory.mktemp("web_server"))


API_KEY = "gsa_web-test-key-0123456789"


@pytest.fixture(scope="module")
def auth_server(web_repo, synthetic_slides, tmp_path_factory) -> str:
    """The same server with API keys on: ``API_KEY`` is its one key (given hashed)."""
    from service.auth import hash_key

    yield from _serve(web_repo, synthetic_slides["slide"], tmp_path_factory.mktemp("web_auth_server"),
                      GSA_AUTH="on", GSA_API_KEYS=f"web:{hash_key(API_KEY)}")


# ---- the browser --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver, both from the system (never downloaded)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        missing("no chromium or chromedriver on PATH")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("GSA_WEB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


def screenshot(driver, folder: Path, name: str) -> Path:
    """Save the viewport as ``<folder>/<name>.png`` and check it is a real, non-blank PNG."""
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, f"{path}: {len(data)} bytes"
    with Image.open(path) as img:
        assert img.size[0] >= 800 and img.size[1] >= 500
        assert len(img.convert("L").getcolors(256 * 256) or range(257)) > 16, f"{path} looks blank"
    return path


def wait_for(driver, condition, timeout_s: float = 30.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def open_page(driver, server: str, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    driver.get(f"{server}/")
    wait_for(driver, lambda d: js(d, f"return [...document.querySelectorAll('#model option')].some(o => o.value === '{model}')"),
             what="the model list")
    Select(driver.find_element("id", "model")).select_by_value(model)
    wait_for(driver, lambda d: d.find_element("id", "model-info").get_attribute("data-model") == model, what="model info")
