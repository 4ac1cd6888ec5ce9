"""The web page at ``/``, end to end: the real server (``python -m service`` on 127.0.0.1) serving the
committed RotMNIST R4 model and a tiny RGB pathology model, driven by headless Chromium (Debian's
``chromium`` and ``chromium-driver``, through selenium; no browser is ever downloaded).

A patch upload shows its label and polar plot; the rotate button turns the patch a quarter turn and
the plotted responses move by one spoke; an error of the API is shown in its own words; a slide job
runs to completion, its heatmap appears, and a tile shows its probabilities. Screenshots of these
states are written to ``$GSA_WEB_SCREENSHOTS`` when set, else to a temporary folder.

Without the browser these tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest
from data_paths import MNIST, SLIDE, require
from PIL import Image
from scoring_fixtures import PATH_MODEL
from web_fixtures import API_KEY, PCAM_R4M, ROOT, R4, js, open_page, screenshot, wait_for
from web_fixtures import auth_server, browser, screenshots, server, web_repo  # noqa: F401  (fixtures)

STATIC = ROOT / "service" / "static"


def test_page_and_its_assets_are_served(server):
    """``/`` is the page; every stylesheet and ES module it loads (following imports) is served with
    its media type; the API around it is unchanged."""
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="static/js/main.js">' in page.text
    assert httpx.get(f"{server}/static/style.css").headers["content-type"].startswith("text/css")
    seen, todo = set(), ["main.js"]
    while todo:
        name = todo.pop()
        seen.add(name)
        r = httpx.get(f"{server}/static/js/{name}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], name
        assert r.headers["cache-control"] == "no-cache"  # revalidated: no stale module after an upgrade
        assert httpx.get(f"{server}/static/js/{name}", headers={"if-none-match": r.headers["etag"]}).status_code == 304
        todo += [line.split('"./')[1].split('"')[0] for line in r.text.splitlines()
                 if line.startswith("import ") and '"./' in line and line.split('"./')[1].split('"')[0] not in seen]
    assert seen == {p.name for p in (STATIC / "js").glob("*.js")}  # every module is used, none is missing
    missing = httpx.get(f"{server}/static/nope.js")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{server}/v1/nope").json()["error"].startswith("no such endpoint")
    assert "/" not in httpx.get(f"{server}/openapi.json").json()["paths"]


def test_page_files_ship_in_the_wheel(tmp_path):
    """The serving install (``pip install .[serve]``, the Docker image) gets the page: the wheel built
    from the files the image copies holds every file under service/static/."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    # the project's setuptools when there is one (no download), else pip's isolated build (from PyPI)
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in STATIC.rglob("*") if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _api_predict(server: str, model: str, pixels: np.ndarray) -> dict:
    r = httpx.post(f"{server}/v1/models/{model}/predict", content=_png(pixels), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


SPOKES = """return [...arguments[0].querySelectorAll('.spoke')].map(s => [
    Number(s.dataset.element), Number(s.dataset.angle), s.dataset.reflection, Number(s.dataset.response)])"""


def _spokes(driver, card) -> tuple[list[float], np.ndarray]:
    rows = js(driver, SPOKES, card)
    assert [r[0] for r in rows] == [0, 1, 2, 3] and all(r[2] == "false" for r in rows)  # R4: no mirrors
    return [r[1] for r in rows], np.array([r[3] for r in rows])


def _done_cards(driver, count: int) -> list | None:
    cards = driver.find_elements("css selector", "li.patch-card[data-state=done]")
    return cards if len(cards) == count else None


def _card_done(driver, card, rotation: int) -> bool:
    return card.get_attribute("data-state") == "done" and card.get_attribute("data-rotation") == str(rotation)


@pytest.fixture(scope="module")
def digits() -> list[np.ndarray]:
    """Two real MNIST digits (a 3 and a 7), 28x28 greyscale."""
    data = np.load(require(MNIST))
    images, labels = data["images"], data["labels"]
    return [images[int(np.flatnonzero(labels == d)[0])] for d in (3, 7)]


def test_patches_show_labels_and_the_rotate_button_turns_the_responses(browser, server, digits, tmp_path, screenshots):
    """Two digits dropped in show the label the API gives and a polar plot of its responses; Rotate 90°
    (by mouse, then by keyboard) turns the patch counter-clockwise, and each quarter turn moves every
    response one spoke on, to exactly what the API answers for the rotated digit."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    paths = []
    for i, pixels in enumerate(digits):
        paths.append(tmp_path / f"digit-{i}.png")
        paths[-1].write_bytes(_png(pixels))
    expected = [_api_predict(server, R4, pixels) for pixels in digits]

    open_page(browser, server, R4)
    browser.find_element("id", "patch-files").send_keys("\n".join(str(p) for p in paths))
    cards = wait_for(browser, lambda d: _done_cards(d, 2), what="two classified patches")
    for card, want, path in zip(cards, expected, paths):
        assert card.find_element("css selector", "h3").text == path.name
        assert card.find_element("css selector", ".pred-label").text == want["label"]
        shown = {li.get_attribute("data-label"): float(li.get_attribute("data-probability"))
                 for li in card.find_elements("css selector", ".probs li")}
        assert shown == pytest.approx(want["probabilities"], abs=1e-6)
        assert card.find_element("css selector", "select.plot-label").get_attribute("value") == want["label"]
        angles, responses = _spokes(browser, card)
        assert angles == [0, 90, 180, 270]
        np.testing.assert_allclose(responses, want["orientation"]["responses"][want["label"]], rtol=1e-6)
    js(browser, "arguments[0].scrollIntoView({block: 'start'})", cards[0])
    screenshot(browser, screenshots, "patches-uploaded")

    card, label = cards[0], expected[0]["label"]
    _, before = _spokes(browser, card)
    # the shift is visible: the responses are not invariant under a quarter turn (else this proves nothing)
    assert not np.allclose(before, np.roll(before, 1), rtol=1e-3, atol=1e-2), before
    card.find_element("css selector", "button.rotate").click()
    wait_for(browser, lambda d: _card_done(d, card, 90), what="the rotated patch's prediction")
    _, after = _spokes(browser, card)
    np.testing.assert_allclose(after, np.roll(before, 1), rtol=1e-4, atol=1e-3)  # one spoke counter-clockwise
    turned = _api_predict(server, R4, np.rot90(digits[0], 1).copy())
    np.testing.assert_allclose(after, turned["orientation"]["responses"][label], rtol=1e-6)
    assert card.find_element("css selector", ".pred-label").text == turned["label"]
    assert "90°" in card.find_element("css selector", "figcaption").text
    js(browser, "arguments[0].scrollIntoView({block: 'start'})", card)
    screenshot(browser, screenshots, "patches-rotated")

    # the keyboard reaches the button: Tab from the file input, Enter on it
    js(browser, "document.getElementById('patch-files').focus()")
    rotate = card.find_element("css selector", "button.rotate")
    for _ in range(10):
        if browser.switch_to.active_element == rotate:
            break
        ActionChains(browser).send_keys(Keys.TAB).perform()  # to whatever has the focus, as a user would
    assert browser.switch_to.active_element == rotate, "Tab never reached the rotate button"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait_for(browser, lambda d: _card_done(d, card, 180), what="the second rotation")
    _, twice = _spokes(browser, card)
    np.testing.assert_allclose(twice, np.roll(before, 2), rtol=1e-4, atol=1e-3)


DROP = """const [name, b64] = arguments;
const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], name, {type: "image/png"}));
document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));"""


def test_a_dropped_patch_is_classified(browser, server, digits):
    """Dropping a file on the drop zone classifies it like a chosen one."""
    import base64

    open_page(browser, server, R4)
    js(browser, DROP, "dropped.png", base64.b64encode(_png(digits[1])).decode())
    (card,) = wait_for(browser, lambda d: _done_cards(d, 1), what="the dropped patch")
    assert card.find_element("css selector", "h3").text == "dropped.png"
    assert card.find_element("css selector", ".pred-label").text == _api_predict(server, R4, digits[1])["label"]


POLAR_D4 = """const done = arguments[arguments.length - 1];
import(new URL("static/js/polar.js", document.baseURI).href).then(({ renderPolar }) => {
    const box = document.createElement("div");
    box.style.width = "230px";
    document.body.prepend(box);
    const elements = [0, 1, 2, 3, 4, 5, 6, 7].map(i => ({index: i, angle: 90 * (i % 4), reflection: i >= 4}));
    renderPolar(box, elements, arguments[0], "tumor");
    done([...box.querySelectorAll(".spoke")].map(s => {
        const line = s.querySelector(".spoke-line");
        return [Number(s.dataset.element), s.dataset.reflection, s.classList.contains("mirrored"),
                s.classList.contains("strongest"), s.querySelector(".spoke-tip").tagName,
                getComputedStyle(line).strokeDasharray, Math.hypot(line.x2.baseVal.value, line.y2.baseVal.value)];
    }));
}, err => done(String(err)));"""


def test_polar_plot_marks_mirrored_elements(browser, server):
    """A D4 group: one spoke per element, mirrored ones dashed with a hollow diamond; lengths run from
    a stub for the weakest response to the full radius for the strongest."""
    responses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.5]
    browser.get(f"{server}/")
    spokes = browser.execute_async_script(POLAR_D4, responses)
    assert isinstance(spokes, list), spokes
    assert [s[0] for s in spokes] == list(range(8))
    for index, reflection, mirrored, strongest, tip, dash, length in spokes:
        assert reflection == str(index >= 4).lower() and mirrored == (index >= 4)
        assert tip == ("rect" if mirrored else "circle") and (dash != "none") == mirrored
        assert strongest == (index == 7)
        assert length == pytest.approx(100 * (0.12 + 0.88 * (responses[index] - 1) / 7.5), abs=1e-3)


def test_api_errors_are_shown_in_their_own_words(browser, server, tmp_path, screenshots):
    """A file that is no image: the card and the live message region show the API's error message."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    open_page(browser, server, R4)
    browser.find_element("id", "patch-files").send_keys(str(notes))
    card = wait_for(browser, lambda d: next(iter(d.find_elements("css selector", "li.patch-card[data-state=error]")), None),
                    what="the error")
    api = httpx.post(f"{server}/v1/models/{R4}/predict", files={"files": ("notes.txt", b"not an image\n", "text/plain")})
    assert api.status_code == 415
    error = card.find_element("css selector", ".error")
    assert error.is_displayed() and api.json()["error"] in error.text and "HTTP 415" in error.text
    messages = browser.find_element("id", "messages")
    assert api.json()["error"] in messages.text and messages.get_attribute("aria-live") == "polite"
    screenshot(browser, screenshots, "patch-error")

    # accessibility basics: every form control has a label, every button a name, every picture a text
    unlabelled = js(browser, """return [...document.querySelectorAll('input, select')]
        .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    assert js(browser, "return [...document.querySelectorAll('button')].filter(b => !b.textContent.trim()).length") == 0
    assert js(browser, "return [...document.querySelectorAll('canvas, svg')].filter(e => !e.getAttribute('aria-label')).length") == 0


def test_slide_job_runs_and_its_heatmap_and_tiles_show(browser, server, synthetic_slides, screenshots):
    """An uploaded slide: the page follows the job from queued or running to succeeded with every tile
    counted, shows the heatmap over the thumbnail, a click on a tile (and an arrow key) shows that
    tile's probabilities as in tiles.csv, and the CSV and GeoJSON download."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server, PATH_MODEL)
    js(browser, """window.jobStates = [];
        new MutationObserver(() => window.jobStates.push(document.getElementById('job-state').textContent))
            .observe(document.getElementById('job-state'), {childList: true, characterData: true, subtree: true});""")
    browser.find_element("id", "slide-file").send_keys(str(synthetic_slides["slide"]))
    browser.find_element("css selector", "#slide-upload-form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_element("id", "job").get_attribute("data-state") in ("succeeded", "failed", "cancelled"),
             timeout_s=120, what="the slide job")
    job_node = browser.find_element("id", "job")
    job = httpx.get(f"{server}/v1/jobs/{job_node.get_attribute('data-job-id')}").json()
    assert job_node.get_attribute("data-state") == job["state"] == "succeeded", job
    total = job["progress"]["total"]
    states = js(browser, "return window.jobStates")
    assert states[0].split(":")[0] in ("queued", "running"), states
    assert states[-1] == f"succeeded: {total} of {total} tiles (100%)", states
    progress = browser.find_element("id", "job-progress")
    assert float(progress.get_attribute("value")) == float(progress.get_attribute("max")) == total > 0

    wait_for(browser, lambda d: d.find_element("id", "heatmap").get_attribute("data-loaded") == "true", what="the heatmap")
    img = browser.find_element("id", "heatmap-img")
    assert img.is_displayed() and js(browser, "return arguments[0].naturalWidth", img) == 1024
    assert "heatmap" in img.get_attribute("alt").lower()
    js(browser, "document.getElementById('job').scrollIntoView({block: 'start'})")
    screenshot(browser, screenshots, "slide-heatmap")

    base = f"{server}/v1/jobs/{job['id']}/results"
    rows = list(csv.DictReader(io.StringIO(httpx.get(f"{base}/tiles.csv").text)))
    assert len(rows) == total
    cells = {(int(r["col"]), int(r["row"])): r for r in rows}
    # a tile with a scored neighbour to its right, near the middle of the tissue
    candidates = sorted((r for (c, rw), r in cells.items() if (c + 1, rw) in cells), key=lambda r: (int(r["row"]), int(r["col"])))
    tile = candidates[len(candidates) // 2]
    width, height = js(browser, "return [arguments[0].clientWidth, arguments[0].clientHeight]", img)
    x = (int(tile["minx"]) + int(tile["width"]) / 2) / 1024 * width
    y = (int(tile["miny"]) + int(tile["height"]) / 2) / 768 * height
    ActionChains(browser).move_to_element_with_offset(img, round(x - width / 2), round(y - height / 2)).click().perform()
    info = browser.find_element("id", "tile-info")

    def shown_tile():
        return info.get_attribute("data-col"), info.get_attribute("data-row")

    wait_for(browser, lambda d: shown_tile() == (tile["col"], tile["row"]), what="the clicked tile")
    probs = {li.get_attribute("data-label"): float(li.get_attribute("data-probability"))
             for li in info.find_elements("css selector", "li")}
    assert probs == pytest.approx({k[5:]: float(v) for k, v in tile.items() if k.startswith("prob_")}, abs=1e-6)
    assert f"predicted {tile['predicted']}" in info.text
    assert browser.find_element("id", "tile-marker").is_displayed()
    screenshot(browser, screenshots, "slide-tile")

    browser.find_element("id", "heatmap").send_keys(Keys.ARROW_RIGHT)
    wait_for(browser, lambda d: shown_tile() == (str(int(tile["col"]) + 1), tile["row"]), what="the tile to the right")

    links = {a.get_attribute("data-result"): a.get_attribute("href")
             for a in browser.find_elements("css selector", "#downloads a")}
    assert {"tiles.csv", "tiles.geojson"} <= set(links)
    assert httpx.get(links["tiles.csv"]).text == httpx.get(f"{base}/tiles.csv").text
    geo = json.loads(httpx.get(links["tiles.geojson"]).text)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == total

    # the job can be chosen again later; a path the data directory lacks gets the API's message
    wait_for(browser, lambda d: job["id"] in js(d, "return [...document.querySelectorAll('#job-select option')].map(o => o.value)"),
             what="the job in the list of earlier jobs")
    browser.find_element("id", "slide-path").send_keys("missing.svs")
    browser.find_element("css selector", "#slide-path-form button[type=submit]").click()
    refused = httpx.post(f"{server}/v1/jobs/slides", json={"model": PATH_MODEL, "path": "missing.svs"})
    assert refused.status_code == 404
    wait_for(browser, lambda d: refused.json()["error"] in d.find_element("id", "messages").text, what="the refusal")
    assert "HTTP 404" in browser.find_element("id", "messages").text


def test_real_slide_with_the_shipped_pathology_model(browser, server, screenshots):
    """The committed D4 model on the real slide (by its path in the data directory): the job runs to
    the end, the heatmap shows over the slide's thumbnail, and a click on a tissue tile shows that
    tile's probabilities as tiles.csv has them."""
    from selenium.webdriver.common.action_chains import ActionChains

    require(SLIDE)
    open_page(browser, server, PCAM_R4M)
    browser.find_element("id", "slide-path").send_keys("real.svs")
    browser.find_element("css selector", "#slide-path-form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_element("id", "job").get_attribute("data-state") in ("succeeded", "failed", "cancelled"),
             timeout_s=300, what="the slide job")
    job = httpx.get(f"{server}/v1/jobs/{browser.find_element('id', 'job').get_attribute('data-job-id')}").json()
    assert job["state"] == "succeeded" and job["model"] == PCAM_R4M, job
    base = f"{server}/v1/jobs/{job['id']}/results"
    meta = httpx.get(f"{base}/metadata.json").json()
    rows = list(csv.DictReader(io.StringIO(httpx.get(f"{base}/tiles.csv").text)))
    assert len(rows) == job["progress"]["total"] == meta["counts"]["scored_tiles"] > 0
    assert meta["model"]["mpp"] == 0.972 and {r["predicted"] for r in rows} <= {"normal", "tumor"}

    wait_for(browser, lambda d: d.find_element("id", "heatmap").get_attribute("data-loaded") == "true", what="the heatmap")
    img = browser.find_element("id", "heatmap-img")
    natural = js(browser, "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    scale = meta["tissue"]["thumbnail_scale"]  # the thumbnail the tissue mask was found on, level-0 px a pixel
    assert all(abs(n - d / scale) <= 1 for n, d in zip(natural, meta["slide"]["dimensions"])), natural
    tile = sorted(rows, key=lambda r: (int(r["row"]), int(r["col"])))[len(rows) // 2]
    width, height = js(browser, "return [arguments[0].clientWidth, arguments[0].clientHeight]", img)
    x = (int(tile["minx"]) + int(tile["width"]) / 2) / scale / natural[0] * width
    y = (int(tile["miny"]) + int(tile["height"]) / 2) / scale / natural[1] * height
    js(browser, "arguments[0].scrollIntoView({block: 'center'})", img)
    ActionChains(browser).move_to_element_with_offset(img, round(x - width / 2), round(y - height / 2)).click().perform()
    info = browser.find_element("id", "tile-info")
    wait_for(browser, lambda d: (info.get_attribute("data-col"), info.get_attribute("data-row")) == (tile["col"], tile["row"]),
             what="the clicked tile")
    probs = {li.get_attribute("data-label"): float(li.get_attribute("data-probability"))
             for li in info.find_elements("css selector", "li")}
    assert probs == pytest.approx({"normal": float(tile["prob_normal"]), "tumor": float(tile["prob_tumor"])}, abs=1e-6)
    screenshot(browser, screenshots, "real-slide-pcam-r4m")


def test_with_api_keys_on_the_page_asks_for_a_key_and_sends_it(browser, auth_server, screenshots):
    """A server with authentication on: the page shows the 401 and a key form (a wrong key is refused
    in the API's words), and with the right key lists the models, runs a slide job and shows its
    heatmap (fetched with the key; a plain <img src> could not send it). The key is no part of any URL."""
    browser.get(f"{auth_server}/")
    form = browser.find_element("id", "key-form")
    wait_for(browser, lambda d: form.is_displayed() and "HTTP 401" in d.find_element("id", "messages").text,
             what="the key form")
    assert js(browser, "return document.querySelectorAll('#model option[value]:not([value=\"\"])').length") == 0

    def use_key(key: str) -> None:
        browser.find_element("id", "api-key").send_keys(key)
        form.find_element("css selector", "button[type=submit]").click()

    use_key("gsa_not-a-key")
    wait_for(browser, lambda d: "HTTP 401" in d.find_element("id", "messages").text, what="the refusal of a wrong key")
    use_key(API_KEY)
    wait_for(browser, lambda d: js(d, f"return [...document.querySelectorAll('#model option')].some(o => o.value === '{PATH_MODEL}')"),
             what="the model list")
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "model")).select_by_value(PATH_MODEL)
    wait_for(browser, lambda d: d.find_element("id", "model-info").get_attribute("data-model") == PATH_MODEL, what="model info")
    browser.find_element("id", "slide-path").send_keys("synthetic.tiff")
    browser.find_element("css selector", "#slide-path-form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_element("id", "job").get_attribute("data-state") in ("succeeded", "failed", "cancelled"),
             timeout_s=120, what="the slide job")
    job_id = browser.find_element("id", "job").get_attribute("data-job-id")
    assert httpx.get(f"{auth_server}/v1/jobs/{job_id}").status_code == 401
    job = httpx.get(f"{auth_server}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert job["state"] == "succeeded", job
    wait_for(browser, lambda d: d.find_element("id", "heatmap").get_attribute("data-loaded") == "true", what="the heatmap")
    img = browser.find_element("id", "heatmap-img")
    assert img.get_attribute("src").startswith("blob:") and js(browser, "return arguments[0].naturalWidth", img) == 1024
    urls = js(browser, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not any(API_KEY in u for u in urls + [browser.current_url])
    screenshot(browser, screenshots, "slide-heatmap-with-key")

