"""Scoring jobs through the HTTP API (TestClient with the lifespan running): submissions by path and
by upload, progress, downloads, cancel, the data-directory boundary, limits, restarts, bad input.

The model has random (seeded) weights: these tests check plumbing, not accuracy.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from data_paths import PCAM, SLIDE, data_path, require
from scoring_fixtures import NO_MPP_MODEL, PATH_MODEL, tissue_image, write_pyramidal_tiff
from test_score_slides import check_qupath_geojson, read_tiles

from service.job_store import JobStore
from service.scoring.slide_scoring import SlideOptions, score_slide

FINISHED = {"succeeded", "failed", "cancelled"}
# a job that takes minutes: every 2-pixel step of the real slide, one tile per batch
SLOW = {"tissue": "none", "stride": 2, "batch_size": 1}


@pytest.fixture
def data_dir(tmp_path, synthetic_slides) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(synthetic_slides["slide"], root / "synthetic.tiff")
    if data_path(SLIDE).is_file():  # the tests that need it skip without it
        shutil.copy(data_path(SLIDE), root / "real.svs")
    return root


def wait_job(client, job_id: str, until=FINISHED, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in until and (until is not RUNNING_WITH_PROGRESS or job["progress"]["done"] > 0):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} is still {job['state']}: {job}")


RUNNING_WITH_PROGRESS = {"running"}


def submit_path(client, path: str, model: str = PATH_MODEL, kind: str = "slides", **options):
    return client.post(f"/v1/jobs/{kind}", json={"model": model, "path": path, "options": options})


def test_slide_job_by_path(jobs_client, path_model, synthetic_slides, tmp_path):
    """202 with a job id; progress up to every tissue tile; each result downloads and matches the
    CLI's engine run on the same slide; a finished job can be deleted."""
    client = jobs_client()
    r = submit_path(client, "synthetic.tiff", batch_size=8)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] in ("queued", "running")
    job = wait_job(client, job["id"])
    assert job["state"] == "succeeded", job
    meta = client.get(job["links"]["results"]["metadata.json"]).json()
    assert job["progress"]["done"] == job["progress"]["total"] == meta["counts"]["scored_tiles"] > 0
    assert job["model_version"] == "1"

    direct = tmp_path / "direct"
    score_slide(path_model, synthetic_slides["slide"], direct, SlideOptions(batch_size=8))
    csv_text = client.get(job["links"]["results"]["tiles.csv"]).text
    assert csv_text == (direct / "tiles.csv").read_text()
    geo = client.get(job["links"]["results"]["tiles.geojson"])
    assert geo.headers["content-type"].startswith("application/geo+json")
    (tmp_path / "job.geojson").write_bytes(geo.content)
    tiles = read_tiles(direct / "tiles.csv")
    check_qupath_geojson(tmp_path / "job.geojson", tiles, ("normal", "tumor"))
    heat = np.load(io.BytesIO(client.get(job["links"]["results"]["heatmap.npy"]).content))
    np.testing.assert_array_equal(heat, np.load(direct / "heatmap.npy"))
    png = client.get(job["links"]["results"]["heatmap.png"])
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}/results/nope.csv").status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}").json() == {"id": job["id"], "deleted": True}
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_upload_real_slide_and_patch_set(jobs_client):
    """The real SVS and an .npz patch set, uploaded as the request body."""
    real_slide = require(SLIDE)
    client = jobs_client()
    r = client.post("/v1/jobs/slides?model=path_r4&filename=cmu%20small.svs", content=real_slide.read_bytes(),
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    assert r.json()["input"]["name"] == "cmu_small.svs" and r.json()["input"]["uploaded"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 40)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    r2 = client.post("/v1/jobs/patches?model=path_r4&filename=set.npz", content=buf.getvalue(),
                     headers={"content-type": "application/octet-stream"})
    assert r2.status_code == 202, r2.text
    slide_job, patch_job = wait_job(client, r.json()["id"]), wait_job(client, r2.json()["id"])
    assert slide_job["state"] == "succeeded", slide_job
    meta = client.get(slide_job["links"]["results"]["metadata.json"]).json()
    assert meta["slide"]["format"] == "aperio" and meta["counts"]["skipped_tiles"] > 0
    assert patch_job["state"] == "succeeded", patch_job
    summary = client.get(patch_job["links"]["results"]["summary.json"]).json()
    rows = list(csv.DictReader(io.StringIO(client.get(patch_job["links"]["results"]["patches.csv"]).text)))
    assert len(rows) == 40 and summary["count"] == 40
    predicted = np.array([r["predicted"] == "tumor" for r in rows])
    assert summary["accuracy"] == pytest.approx(float((predicted == (y == 1)).mean()))


def test_paths_must_stay_inside_the_data_directory(jobs_client, data_dir, tmp_path):
    client = jobs_client()
    outside = tmp_path / "outside.tiff"
    shutil.copy(data_dir / "synthetic.tiff", outside)
    (data_dir / "link.tiff").symlink_to(outside)
    for path in ("../outside.tiff", str(outside), "link.tiff", "sub/../../outside.tiff", "/etc/passwd"):
        r = submit_path(client, path)
        assert r.status_code == 403, (path, r.text)
        assert "outside the data directory" in r.json()["error"]
    np.save(data_dir / "x.npy", np.zeros((2, 16, 16, 3), np.uint8))
    np.save(outside.with_suffix(".npy"), np.zeros(2, np.uint8))
    r = submit_path(client, "x.npy", kind="patches", labels_path="../outside.npy")
    assert r.status_code == 403 and "outside the data directory" in r.json()["error"]
    r = submit_path(client, "synthetic.tiff", max_plain_pixels=10**12)
    assert r.status_code == 400 and "server limit" in r.json()["error"]
    r = submit_path(client, "missing.svs")
    assert r.status_code == 404 and "does not exist" in r.json()["error"]
    assert submit_path(client, str(data_dir / "synthetic.tiff")).status_code == 202  # absolute but inside
    assert client.get("/v1/jobs").json()["jobs"][0]["input"]["path"] == "synthetic.tiff"  # never the server's path

    no_data = jobs_client(data_dir=None, jobs_dir=tmp_path / "jobs2")
    r = submit_path(no_data, "synthetic.tiff")
    assert r.status_code == 403 and "GSA_DATA_DIR" in r.json()["error"]


def test_upload_limit_and_bad_requests(jobs_client):
    client = jobs_client(max_upload_bytes=1000, max_body_bytes=500)
    r = client.post("/v1/jobs/slides?model=path_r4", content=b"x" * 2000,
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413 and "1000" in r.json()["error"]
    assert client.post("/v1/jobs/slides?model=nope", content=b"x" * 10,
                       headers={"content-type": "application/octet-stream"}).status_code == 404
    r = submit_path(client, "synthetic.tiff", min_tissue=2)
    assert r.status_code == 400 and "min_tissue" in r.json()["error"]
    r = submit_path(client, "synthetic.tiff", colour="blue")
    assert r.status_code == 400 and "unknown slide options" in r.json()["error"]
    assert client.post("/v1/jobs/slides", content=b"a,b", headers={"content-type": "text/csv"}).status_code == 415
    assert client.get("/v1/jobs/../../etc").status_code == 404
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was queued, no upload left behind


def test_cancel_and_concurrency_limit(jobs_client):
    """With one job at a time the second waits queued; cancelling it is immediate, cancelling the
    running one stops it at its next batch."""
    require(SLIDE)
    client = jobs_client(max_concurrent_jobs=1)
    slow = submit_path(client, "real.svs", **SLOW).json()
    second = submit_path(client, "synthetic.tiff").json()
    running = wait_job(client, slow["id"], RUNNING_WITH_PROGRESS)
    assert running["progress"]["total"] > 50_000 > running["progress"]["done"]
    assert client.get(f"/v1/jobs/{second['id']}").json()["state"] == "queued"
    r = client.delete(f"/v1/jobs/{second['id']}")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{slow['id']}").status_code == 202
    job = wait_job(client, slow["id"], timeout_s=10)
    assert job["state"] == "cancelled" and job["progress"]["done"] < job["progress"]["total"]
    r = client.get(f"/v1/jobs/{slow['id']}/results/tiles.csv")
    assert r.status_code == 409 and "cancelled" in r.json()["error"]


def test_restart_resumes_or_fails_interrupted_jobs(jobs_client, tmp_path):
    """A job running when the service stops is left 'running' on disk; the next start runs it
    again (or, with resuming off, marks it failed with the reason)."""
    require(SLIDE)
    jobs_dir = tmp_path / "jobs"
    first = jobs_client(jobs_dir=jobs_dir)
    job = submit_path(first, "real.svs", **SLOW).json()
    wait_job(first, job["id"], RUNNING_WITH_PROGRESS)
    first.__exit__(None, None, None)  # stop the service mid-job
    on_disk = JobStore(jobs_dir).get(job["id"])
    assert on_disk.state.value == "running" and on_disk.attempts == 1

    second = jobs_client(jobs_dir=jobs_dir)
    resumed = wait_job(second, job["id"], RUNNING_WITH_PROGRESS)
    assert resumed["attempts"] == 2 and "service restart" in resumed["notes"][0]
    second.__exit__(None, None, None)

    third = jobs_client(jobs_dir=jobs_dir, resume_jobs=False)
    failed = third.get(f"/v1/jobs/{job['id']}").json()
    assert failed["state"] == "failed" and "interrupted by a service restart" in failed["error"]


def test_bad_input_fails_clearly_and_other_jobs_go_on(jobs_client, data_dir, synthetic_slides):
    """Corrupt and truncated slides, an unsupported format, an empty tissue mask, a slide without a
    resolution: each job fails with a message naming the problem; a good job queued after them
    succeeds. A model card without mpp is refused at submission."""
    good = synthetic_slides["slide"].read_bytes()
    (data_dir / "truncated.tiff").write_bytes(good[: len(good) // 3])
    corrupt = bytearray(good)
    corrupt[len(good) // 2:] = bytes(len(good) - len(good) // 2)  # tile data zeroed: zlib streams broken
    (data_dir / "corrupt.tiff").write_bytes(bytes(corrupt))
    (data_dir / "notes.txt").write_text("not a slide\n")
    write_pyramidal_tiff(data_dir / "blank.tiff", tissue_image(256, 256, blank_right=1.0))
    shutil.copy(synthetic_slides["nompp"], data_dir / "nompp.tiff")
    expected = {
        "truncated.tiff": "damaged or truncated", "corrupt.tiff": "could not read",
        "notes.txt": "neither a slide OpenSlide reads", "blank.tiff": "no tile of blank.tiff has at least 50% tissue",
        "nompp.tiff": "does not record its resolution",
    }
    if data_path(SLIDE).is_file():  # the real slide adds one case where it is there
        (data_dir / "truncated.svs").write_bytes(data_path(SLIDE).read_bytes()[:1_000_000])
        expected["truncated.svs"] = "truncated.svs looks like a slide"
    client = jobs_client(max_concurrent_jobs=1)
    r = submit_path(client, "synthetic.tiff", model=NO_MPP_MODEL)
    assert r.status_code == 400 and "no resolution ('mpp')" in r.json()["error"]
    ids = {name: submit_path(client, name).json()["id"] for name in expected}
    good_id = submit_path(client, "synthetic.tiff").json()["id"]
    for name, message in expected.items():
        job = wait_job(client, ids[name])
        assert job["state"] == "failed", (name, job)
        assert message in job["error"], (name, job["error"])
    assert wait_job(client, good_id)["state"] == "succeeded"


def test_imagefolder_patch_job_by_path(jobs_client, data_dir):
    """A folder tree inside the data directory (real PCam patches, classes 0 and 1), centre-cropped."""
    pcam = require(PCAM) / "valid"
    for label in ("0", "1"):
        (data_dir / "pcam" / label).mkdir(parents=True)
        for src in sorted((pcam / label).glob("*.jpg"))[:8]:
            shutil.copy(src, data_dir / "pcam" / label / src.name)
    client = jobs_client()
    r = submit_path(client, "pcam", kind="patches", fit="crop", batch_size=4)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"]["done"] == job["progress"]["total"] == 16
    summary = client.get(job["links"]["results"]["summary.json"]).json()
    assert summary["count"] == 16 and sum(map(sum, summary["confusion_matrix"]["matrix"])) == 16
    meta = client.get(job["links"]["results"]["metadata.json"]).json()
    assert meta["source"]["kind"] == "imagefolder" and meta["source"]["labelled"]


def test_jobs_without_a_model_use_the_best_pathology_model(jobs_client, model_repo):
    """A slide job that names no model runs on the served pathology model (path_nompp, without mpp,
    is passed over); a service with no pathology model answers 400 saying to name one."""
    client = jobs_client()
    r = client.post("/v1/jobs/slides", json={"path": "synthetic.tiff", "options": {"batch_size": 8}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "succeeded" and job["model"] == PATH_MODEL, job
    r = client.post("/v1/jobs/slides", json={"path": "synthetic.tiff", "model": None, "version": None})
    assert r.status_code == 202 and r.json()["model"] == PATH_MODEL, r.text  # null is "not named"
    r = client.post("/v1/jobs/slides", json={"path": "synthetic.tiff", "model": 3})
    assert r.status_code == 400 and "model and version strings or null" in r.json()["error"], r.text
    plain = jobs_client(model_dir=model_repo)  # gsa_tiny only: greyscale, no mpp
    r = plain.post("/v1/jobs/slides", json={"path": "synthetic.tiff"})
    assert r.status_code == 400 and "name the model" in r.json()["error"], r.text


def test_the_default_pathology_model_is_configurable(jobs_client, data_dir, service_logs):
    """GSA_PATHOLOGY_MODEL replaces the ranking for jobs that name no model (here the lower-ranked
    path_nompp: patch sets need no mpp, slides still do); a name that is not served is a warning at
    start-up and a 400 saying so at submission."""
    from PIL import Image

    (data_dir / "tiles").mkdir()
    for i in range(4):
        Image.fromarray(tissue_image(96, 96, seed=i, blank_right=0.0)).save(data_dir / "tiles" / f"{i}.png")
    client = jobs_client(pathology_model=NO_MPP_MODEL)
    r = client.post("/v1/jobs/patches", json={"path": "tiles", "options": {"fit": "crop", "batch_size": 4}})
    assert r.status_code == 202 and r.json()["model"] == NO_MPP_MODEL, r.text
    assert wait_job(client, r.json()["id"])["state"] == "succeeded"
    r = client.post("/v1/jobs/slides", json={"path": "synthetic.tiff"})
    assert r.status_code == 400 and "has no resolution ('mpp')" in r.json()["error"], r.text
    r = client.post("/v1/jobs/slides", json={"path": "synthetic.tiff", "model": PATH_MODEL})
    assert r.status_code == 202 and r.json()["model"] == PATH_MODEL, r.text  # a named model still wins

    assert not any("GSA_PATHOLOGY_MODEL" in r.getMessage() for r in service_logs)
    missing = jobs_client(pathology_model="nope")
    warned = [r.getMessage() for r in service_logs if r.levelno == logging.WARNING]
    assert any("GSA_PATHOLOGY_MODEL names 'nope', which is not in the model repository" in m for m in warned), warned
    r = missing.post("/v1/jobs/slides", json={"path": "synthetic.tiff"})
    assert r.status_code == 400 and "'nope' (GSA_PATHOLOGY_MODEL) is not served" in r.json()["error"], r.text
