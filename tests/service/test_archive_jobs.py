"""Slide archives as jobs (``POST /v1/jobs/archives``, TestClient with the lifespan running): scored in
the service's process without a Ray address, on the actors of a Ray cluster (started here with
``ray start``, every socket on loopback) with one; a corrupt slide listed while the others are
kept; files byte for byte those of ``score_slide``; a job stopped by a restart resumes from the
slides already sealed; refusals at submission.

The model has random (seeded) weights: these tests check plumbing, not accuracy. The Ray test skips
without Ray (the ``distributed`` extra), except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from loopback import descendants, sockets_off_loopback
from scoring_fixtures import NO_MPP_MODEL, PATH_MODEL
from test_archive import COMPARED
from test_score_jobs import wait_job

import service.distributed.archive as archive_module
from service.job_store import JobStore
from service.scoring.slide_scoring import SlideOptions, score_slide

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"batch_size": 16, "stride": 32}  # every other tile each way; batches the batcher does not split
SLIDES = ("a", "case2/b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def data_dir(tmp_path, synthetic_slides) -> Path:
    """``archive/``: two synthetic pyramidal TIFFs (one in a sub-folder), a corrupt 'slide' and a text
    file; ``empty/``: no slide; ``outside.tiff`` beside the data directory."""
    root = tmp_path / "data"
    (root / "archive" / "case2").mkdir(parents=True)
    (root / "empty").mkdir()
    shutil.copy(synthetic_slides["slide"], root / "archive" / "a.tiff")
    shutil.copy(synthetic_slides["rotated"], root / "archive" / "case2" / "b.tiff")
    (root / "archive" / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    (root / "archive" / "notes.txt").write_text("not a slide\n")
    shutil.copy(synthetic_slides["slide"], tmp_path / "outside.tiff")
    return root


def _session(sid: int) -> list[int]:
    """The processes of session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _end_with_this_process() -> None:
    """In the child, before ``exec``: SIGTERM when this process ends, however it ends (a crash in a
    native library, SIGKILL), so that a Ray head in its own session is never left behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _set_env(values: dict[str, str | None]) -> None:
    """Set (None: unset) environment variables, and make an imported Ray read its authentication
    settings again (read when it is imported; a local ``ray.init()`` elsewhere in this session sets
    ``RAY_AUTH_MODE``)."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "ray" in sys.modules:
        from ray._private.authentication_test_utils import reset_auth_token_state

        reset_auth_token_state()


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` on 127.0.0.1 (2 CPUs, no dashboard) in its own session, with token
    authentication (a token made here); its address. This process (the service) is given the token
    as a deployment would be (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``: docs/distributed.md).
    Stopped by signalling that process and waiting for every process of its session, never with
    ``ray stop`` (which would stop every Ray instance of the user). Its own temporary folder, removed
    after: ``ray start`` writes the address of its cluster there, where a later ``ray.init()`` in
    ``/tmp/ray`` would otherwise find it and try to join a stopped cluster."""
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed (CI installs the 'distributed' extra: scripts/test.sh)")
        pytest.skip("ray is not installed: pip install -e '.[distributed]'")
    temp = Path(tempfile.mkdtemp(prefix="gsa-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    # read when ray is imported: set before; the token for the head and for this process
    settings = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_AUTH_TOKEN": None}
    saved = {name: os.environ.get(name) for name in settings}
    _set_env(settings)
    port = _free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--ray-client-server-port={_free_port()}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=_end_with_this_process)
    try:
        deadline = time.monotonic() + 90
        while True:  # the GCS answers once the head is up (ray.init waits for the rest)
            assert head.poll() is None, f"ray start exited with {head.returncode}"
            assert time.monotonic() < deadline, "the Ray head did not start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _session(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _session(head.pid):
            os.killpg(head.pid, signal.SIGKILL)  # its own session and process group: only what it started
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)
        _set_env(saved)


def submit(client, path: str, model: str = PATH_MODEL, **options):
    return client.post("/v1/jobs/archives", json={"model": model, "path": path, "options": options or OPTIONS})


def check_results(client, job: dict, data_dir: Path, path_model, tmp_path) -> dict:
    """The job succeeded with two slides done and the corrupt one failed; every slide's files download
    and are byte for byte ``score_slide``'s; the summary names no server path. Returns the summary."""
    assert job["state"] == "succeeded", job
    assert job["kind"] == "archive" and job["model_version"] == "1"
    assert job["progress"]["done"] == job["progress"]["total"] == 3 and job["progress"]["tiles"] > 0
    failures = [note for note in job["notes"] if "slides failed" in note]
    assert len(failures) == 1 and failures[0].startswith("1 of 3 slides failed") and "broken" in failures[0]
    r = client.get(job["links"]["results"]["summary.json"])
    assert r.status_code == 200
    summary = r.json()
    assert str(data_dir) not in r.text and str(data_dir.parent) not in r.text
    assert (summary["slides"], summary["done"] + summary["skipped"]) == (3, 2)
    assert [(f["name"], f["path"]) for f in summary["failed"]] == [("broken", "archive/broken.svs")]
    assert "broken.svs" in summary["failed"][0]["error"]
    assert summary["tiles"] == job["progress"]["tiles"]
    names = {"a": data_dir / "archive" / "a.tiff", "case2/b": data_dir / "archive" / "case2" / "b.tiff"}
    assert sorted(job["results"]) == sorted(["summary.json"] + [f"{n}/{f}" for n in SLIDES
                                                                for f in ("tiles.csv", "tiles.geojson", "heatmap.npy",
                                                                          "heatmap.png", "metadata.json")])
    for name, slide in names.items():
        ref = tmp_path / "ref" / name
        meta = score_slide(path_model, slide, ref, SlideOptions(**OPTIONS))
        for file in COMPARED:
            got = client.get(job["links"]["results"][f"{name}/{file}"])
            assert got.status_code == 200 and got.content == (ref / file).read_bytes(), (name, file)
        got = client.get(job["links"]["results"][f"{name}/metadata.json"]).json()
        for m in (got, meta):
            m.pop("timing")
        assert got == meta
    assert client.get(f"/v1/jobs/{job['id']}/results/broken/tiles.csv").status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/results/a/done.json").status_code == 404  # only the listed files
    return summary


def test_archive_job_in_this_process(jobs_client, data_dir, path_model, tmp_path):
    """Without a Ray address the job scores in the service's process with the served model; the
    service imports no Ray for it."""
    ray_before = "ray" in sys.modules
    client = jobs_client()
    r = submit(client, "archive")
    assert r.status_code == 202, r.text
    assert r.json()["input"]["path"] == "archive" and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = wait_job(client, r.json()["id"])
    summary = check_results(client, job, data_dir, path_model, tmp_path)
    assert summary["engine"] == "this process" and summary["skipped"] == 0
    assert {r["pid"] for r in summary["per_slide"] if r["status"] == "done"} == {os.getpid()}
    if not ray_before:
        assert "ray" not in sys.modules, "an archive job without a Ray address imported ray"

    # a glob pattern and a CSV manifest name the same slides (the manifest: other output names)
    (data_dir / "list.csv").write_text("path,name\narchive/a.tiff,first\narchive/case2/b.tiff,second\n")
    for path, names in (("archive/**/*.tiff", ["a", "b"]), ("list.csv", ["first", "second"])):
        job = wait_job(client, submit(client, path).json()["id"])
        assert job["state"] == "succeeded" and job["notes"] == [], job
        assert sorted({name.rsplit("/", 1)[0] for name in job["results"] if "/" in name}) == names


def hold_after_first_slide(monkeypatch) -> tuple[threading.Event, list[str]]:
    """Slides scored in this process hold after the first one done until the job's cancel event is set
    (a cancel or a stop): an event set when it holds, and the names of the slides scored."""
    gate, scored = threading.Event(), []
    real = archive_module.score_item

    def hold(model, item, out, options, stamp, cancel=None):
        record = real(model, item, out, options, stamp, cancel)
        scored.append(item.name)
        if record["status"] == "done" and not gate.is_set():
            gate.set()
            cancel.wait(60)
        return record

    monkeypatch.setattr(archive_module, "score_item", hold)
    return gate, scored


def test_archive_job_cancel(jobs_client, monkeypatch):
    """A running archive job cancelled through the API stops before its next slide: 'cancelled', one
    slide scored, no results to download."""
    gate, scored = hold_after_first_slide(monkeypatch)
    client = jobs_client()
    job_id = submit(client, "archive").json()["id"]
    assert gate.wait(120), "the first slide was not scored"
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert running["state"] == "running" and running["progress"]["total"] == 3  # slides, counted at the start
    r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 202
    job = wait_job(client, job_id, timeout_s=30)
    assert job["state"] == "cancelled" and job["error"] == "cancelled while running", job
    assert scored == ["a"]
    assert client.get(f"/v1/jobs/{job_id}/results/summary.json").status_code == 409


def test_archive_job_resumes_after_a_restart(jobs_client, data_dir, path_model, tmp_path, monkeypatch):
    """A service stopped while its archive job runs leaves it 'running'; the next start runs it again,
    skipping the slide already sealed, and the files are those of an uninterrupted run."""
    gate, scored = hold_after_first_slide(monkeypatch)
    jobs_dir = tmp_path / "jobs"
    first = jobs_client(jobs_dir=jobs_dir)
    job_id = submit(first, "archive").json()["id"]
    assert gate.wait(120), "the first slide was not scored"
    first.__exit__(None, None, None)  # stop the service mid-job
    on_disk = JobStore(jobs_dir).get(job_id)
    assert on_disk.state.value == "running" and on_disk.attempts == 1 and scored == ["a"]

    second = jobs_client(jobs_dir=jobs_dir)
    job = wait_job(second, job_id)
    summary = check_results(second, job, data_dir, path_model, tmp_path)
    assert job["attempts"] == 2 and "service restart" in job["notes"][0]
    assert summary["skipped_slides"] == ["a"] and job["progress"]["resumed_from"] == 1
    assert scored == ["a", "broken", "case2/b"], "a sealed slide was scored again"


def test_archive_job_on_ray(ray_head, jobs_client, data_dir, path_model, tmp_path, monkeypatch):
    """With ``GSA_RAY_ADDRESS`` the slides are scored by Ray actors (other processes), the files are the
    same, and every socket of this process and of the Ray processes is on loopback."""
    seen: dict[str, tuple[int, list]] = {}
    release = archive_module._RAY.release

    def check_then_release(ray):  # while this process is connected to the cluster
        seen["outside"] = sockets_off_loopback({os.getpid()} | descendants(os.getpid()))
        release(ray)

    monkeypatch.setattr(archive_module._RAY, "release", check_then_release)
    client = jobs_client(ray_address=ray_head, ray_workers=2, ray_threads=1)
    r = submit(client, "archive")
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout_s=300)
    summary = check_results(client, job, data_dir, path_model, tmp_path)
    assert summary["engine"] == f"ray ({ray_head}), 2 workers"
    done = [r for r in summary["per_slide"] if r["status"] == "done"]
    assert len(done) == 2 and all(r["pid"] != os.getpid() and r["host"] for r in done), done
    assert seen["outside"] == []  # (sockets_off_loopback fails when too few sockets are seen to tell)
    import ray

    assert not ray.is_initialized(), "the job's connection to Ray was left open"


def test_archive_submissions_refused(jobs_client, data_dir, tmp_path, monkeypatch):
    """Uploads (400), paths and slides outside the data directory (403), nothing to score (400),
    an unknown model (404) or one without mpp (400), a Ray address without Ray (503): nothing queued."""
    client = jobs_client()
    r = client.post(f"/v1/jobs/archives?model={PATH_MODEL}&filename=a.tiff", content=b"II*\x00" + b"\x00" * 64,
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and "archive jobs take no upload" in r.json()["error"]
    outside = tmp_path / "outside.tiff"
    (data_dir / "links").mkdir()
    (data_dir / "links" / "a.tiff").symlink_to(outside)
    (data_dir / "up.csv").write_text("path,name\n../outside.tiff,up\n")
    (data_dir / "abs.csv").write_text(f"path,name\n{outside},abs\n")
    for path in ("../", str(tmp_path), "../*.tiff", "archive/../../*.tiff", "links", "links/*.tiff", "up.csv",
                 "abs.csv"):
        r = submit(client, path)
        assert r.status_code == 403, (path, r.text)
        assert "outside the data directory" in r.json()["error"]
        if path in ("links", "up.csv"):  # named as the client would: no server path
            assert str(tmp_path) not in r.json()["error"], r.json()["error"]
    (data_dir / "latin1.csv").write_bytes("path\nd\xe9j\xe0.tiff\n".encode("latin-1"))
    for path, message in (("empty", "no slides found"), ("archive/*.svs2", "no slides found"),
                          ("archive/notes.txt", "not a folder, a glob pattern or a .csv manifest"),
                          ("latin1.csv", "not a readable CSV manifest")):
        r = submit(client, path)
        assert r.status_code == 400 and message in r.json()["error"], (path, r.text)
        assert str(data_dir) not in r.json()["error"]
    assert submit(client, "missing").status_code == 404
    r = submit(client, "archive", model="nope")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = submit(client, "archive", model=NO_MPP_MODEL)
    assert r.status_code == 400 and "no resolution ('mpp')" in r.json()["error"]
    r = submit(client, "archive", colour="blue")
    assert r.status_code == 400 and "unknown slide options" in r.json()["error"]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "ray" else real_find_spec(name, *args))
    no_ray = jobs_client(ray_address="127.0.0.1:6379", jobs_dir=tmp_path / "jobs2")
    r = submit(no_ray, "archive")
    assert r.status_code == 503 and "Ray is not installed" in r.json()["error"]
    assert client.get("/v1/jobs").json()["jobs"] == [] and no_ray.get("/v1/jobs").json()["jobs"] == []


def test_the_plain_service_does_not_import_ray():
    """Importing the app, the job manager and the archive engine loads no Ray (it is the optional extra)."""
    code = ("import sys; import service.app, service.jobs, service.score, service.distributed.archive; "
            "service.app.create_app(); print('ray' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GSA_LOG_LEVEL": "WARNING"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
