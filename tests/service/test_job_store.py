"""The job store and what it carries: SQLite (WAL, migrations, exclusive claims across connections,
old job.json files imported), paginated listing, ownership, no server paths in responses, patch
colour and size rules at submission, job metrics, and checkpoints (an engine run cancelled and
resumed; a real server SIGKILLed mid-job and restarted) that give the same result files."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_settings, wait_ready
from scoring_fixtures import PATH_MODEL
from test_score_jobs import FINISHED, data_dir, submit_path, wait_job  # noqa: F401 (the fixture, shared)

from service.job_store import DB_FILE, SCHEMA_VERSION, Job, JobState, JobStore
from service.scoring.checkpoint import Checkpoint
from service.scoring.scoring_errors import Cancelled
from service.scoring.slide_scoring import SlideOptions, score_slide

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("tiles.csv", "tiles.geojson", "heatmap.npy", "heatmap.png")




def _job(i: int, state: JobState = JobState.SUCCEEDED, owner: str | None = None) -> Job:
    return Job(f"{i:032x}", "slide", PATH_MODEL, None, {"path": f"s{i}.tiff", "uploaded": False, "name": f"s{i}.tiff"},
               {}, state=state, owner=owner, created_at=1000.0 + i // 2, source=f"/nowhere/s{i}.tiff")


def test_store_is_sqlite_wal_with_a_schema_version(tmp_path):
    store = JobStore(tmp_path)
    store.open()
    store.open()  # idempotent: migrations run once
    with sqlite3.connect(tmp_path / DB_FILE) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.insert(_job(1))
    assert store.get(_job(1).id).source == "/nowhere/s1.tiff"
    with sqlite3.connect(tmp_path / DB_FILE) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        store.open()


def test_claims_are_exclusive_across_connections(tmp_path):
    """Four workers, each with its own store object (own connections), take 40 queued jobs: each job
    is taken exactly once."""
    JobStore(tmp_path).open()
    for i in range(40):
        assert JobStore(tmp_path).insert(_job(i, JobState.QUEUED))
    taken: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        store = JobStore(tmp_path)
        while (job := store.claim(name, lambda j: setattr(j, "state", JobState.RUNNING))) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == sorted(_job(i).id for i in range(40))
    assert JobStore(tmp_path).counts()["running"] == 40
    assert not JobStore(tmp_path).insert(_job(99, JobState.QUEUED), max_queued=0)


def test_pagination_state_filter_and_ownership(path_model_repo, data_dir, tmp_path):
    """Pages by cursor and by offset cover every job once, oldest first; a caller with a principal
    sees, downloads, cancels and deletes only its own jobs (others are 404); without one, all."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    store = JobStore(tmp_path / "jobs")
    store.open()
    for i in range(7):
        store.insert(_job(i, JobState.FAILED if i == 3 else JobState.SUCCEEDED, owner="alice" if i % 2 else "bob"))
    app = create_app(make_settings(path_model_repo, jobs_dir=tmp_path / "jobs", data_dir=data_dir, warmup=False))

    @app.middleware("http")
    async def fake_auth(request, call_next):  # stands in for service.auth: sets the principal
        request.state.principal = request.headers.get("x-principal")
        return await call_next(request)

    with TestClient(app) as client:
        wait_ready(client.get)
        ids, cursor = [], None
        while True:
            body = client.get("/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            ids += [j["id"] for j in body["jobs"]]
            cursor = body["next"]
            if cursor is None:
                break
        assert ids == [_job(i).id for i in range(7)]
        assert [j["id"] for j in client.get("/v1/jobs?limit=2&offset=5").json()["jobs"]] == ids[5:]
        newest = client.get("/v1/jobs?limit=4&order=desc").json()
        later = client.get(f"/v1/jobs?limit=4&order=desc&cursor={newest['next']}").json()
        assert [j["id"] for j in newest["jobs"] + later["jobs"]] == ids[::-1] and later["next"] is None
        failed = client.get("/v1/jobs?state=failed").json()["jobs"]
        assert [j["id"] for j in failed] == [ids[3]], [(j["id"][-2:], j["state"], j.get("error")) for j in failed]
        assert client.get("/v1/jobs?limit=501").status_code == 422
        assert client.get("/v1/jobs?cursor=bm9wZQ").status_code == 400

        alice, bob = {"x-principal": "alice"}, {"x-principal": "bob"}
        assert [j["id"] for j in client.get("/v1/jobs", headers=alice).json()["jobs"]] == ids[1::2]
        anonymous = submit_path(client, "synthetic.tiff", batch_size=32)
        r = client.post("/v1/jobs/slides", json={"model": PATH_MODEL, "path": "synthetic.tiff"}, headers=alice)
        assert r.status_code == 202 and r.json()["owner"] == "alice"
        mine = wait_job(client, r.json()["id"])
        assert mine["state"] == "succeeded", mine
        for other in (bob, {"x-principal": "carol"}):
            assert client.get(f"/v1/jobs/{mine['id']}", headers=other).status_code == 404
            assert client.get(f"/v1/jobs/{mine['id']}/results/tiles.csv", headers=other).status_code == 404
            assert client.delete(f"/v1/jobs/{mine['id']}", headers=other).status_code == 404
        assert client.get(f"/v1/jobs/{mine['id']}/results/tiles.csv", headers=alice).status_code == 200
        assert mine["id"] in [j["id"] for j in client.get("/v1/jobs?limit=500").json()["jobs"]]  # auth off: all
        assert mine["id"] not in [j["id"] for j in client.get("/v1/jobs?limit=500", headers=bob).json()["jobs"]]
        assert client.delete(f"/v1/jobs/{mine['id']}", headers=alice).json()["deleted"]
        assert wait_job(client, anonymous.json()["id"])["owner"] is None


def test_no_server_path_in_responses_or_results(jobs_client, data_dir, tmp_path):
    """Job JSON, metadata.json and error messages name inputs relative to the data directory."""
    (data_dir / "sub").mkdir()
    shutil.copy(data_dir / "synthetic.tiff", data_dir / "sub" / "s.tiff")
    (data_dir / "sub" / "notes.txt").write_text("not a slide\n")
    rng = np.random.default_rng(1)
    np.savez(data_dir / "sub" / "set.npz", x=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.save(data_dir / "sub" / "y.npy", rng.integers(0, 2, 6))
    client = jobs_client()
    good = submit_path(client, str(data_dir / "sub" / "s.tiff"), batch_size=32).json()
    bad = submit_path(client, "sub/notes.txt").json()
    patches = submit_path(client, "sub/set.npz", kind="patches", labels_path="sub/y.npy").json()
    assert patches["options"]["labels_path"] == "sub/y.npy"
    texts = []
    for job in (good, bad, patches):
        job = wait_job(client, job["id"])
        texts.append(json.dumps(job))
        if job["state"] == "succeeded":
            texts.append(client.get(job["links"]["results"]["metadata.json"]).text)
    assert json.loads(texts[1])["slide"]["path"] == "sub/s.tiff"
    assert json.loads(texts[2])["state"] == "failed" and "notes.txt" in json.loads(texts[2])["error"]
    assert json.loads(texts[4])["options"]["labels_path"] == "y.npy"
    texts.append(client.get("/v1/jobs").text)
    for text in texts:
        for secret in (str(data_dir), str(tmp_path), str(data_dir.resolve())):
            assert secret not in text


def test_patch_jobs_follow_predicts_colour_rules_and_refuse_misfits(app_client, path_model_repo, model_repo,
                                                                     data_dir, tmp_path):
    """RGB patches for a greyscale model are refused (422) unless convert=true; patches of the wrong
    size with fit='error' are refused at submission, not queued to fail; greyscale stored as equal
    RGB channels passes."""
    repo = tmp_path / "models"
    shutil.copytree(path_model_repo, repo)
    shutil.copytree(model_repo / "gsa_tiny" / "1", repo / "gsa_tiny" / "1")
    rng = np.random.default_rng(2)
    np.save(data_dir / "rgb.npy", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    grey = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    np.save(data_dir / "grey_as_rgb.npy", np.repeat(grey, 3, axis=3))
    np.save(data_dir / "big.npy", rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8))
    client = app_client(model_dir=repo, jobs_dir=tmp_path / "jobs", data_dir=data_dir, warmup=False)
    r = submit_path(client, "rgb.npy", model="gsa_tiny", kind="patches")
    assert r.status_code == 422 and "convert=true" in r.json()["error"], r.text
    r = submit_path(client, "big.npy", kind="patches")
    assert r.status_code == 422 and "20x20" in r.json()["error"], r.text
    buf = io.BytesIO()
    np.save(buf, rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8))
    r = client.post(f"/v1/jobs/patches?model={PATH_MODEL}&filename=big.npy", content=buf.getvalue(),
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing queued, no upload left behind
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]
    converted = submit_path(client, "rgb.npy", model="gsa_tiny", kind="patches", convert=True)
    same = submit_path(client, "grey_as_rgb.npy", model="gsa_tiny", kind="patches")
    resized = submit_path(client, "big.npy", kind="patches", fit="resize")
    for r in (converted, same, resized):
        assert r.status_code == 202, r.text
        assert wait_job(client, r.json()["id"])["state"] == "succeeded"


def test_metrics_count_jobs_tiles_and_queue(jobs_client):
    client = jobs_client()
    job = wait_job(client, submit_path(client, "synthetic.tiff", batch_size=32).json()["id"])
    assert job["state"] == "succeeded"
    text = client.get("/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("gsa_job")}
    assert values['gsa_jobs{state="succeeded"}'] == 1 and values['gsa_jobs{state="running"}'] == 0
    assert values["gsa_jobs_queued"] == 0
    assert values['gsa_job_tiles_scored_total{kind="slide"}'] == job["progress"]["total"] > 0


def test_checkpoint_resume_gives_the_same_files(path_model, synthetic_slides, tmp_path):
    """An engine run cancelled after 5 batches and run again with the same checkpoint folder scores
    only the tiles after the last checkpoint and writes the same files as an uninterrupted run; a
    checkpoint of other options is not used."""
    options = SlideOptions(tissue="none", batch_size=16)
    slide = synthetic_slides["slide"]
    score_slide(path_model, slide, tmp_path / "ref", options)
    cp = Checkpoint(tmp_path / "cp", 40)  # rounded up to 48: whole batches
    cancel = threading.Event()

    def stop_after(done: int, total: int) -> None:
        if done >= 80:
            cancel.set()

    with pytest.raises(Cancelled):
        score_slide(path_model, slide, tmp_path / "run", options, progress=stop_after, cancel=cancel, checkpoint=cp)
    assert cp.every == 48 and cp.saved == 48
    seen = []
    meta = score_slide(path_model, slide, tmp_path / "run", options, checkpoint=Checkpoint(tmp_path / "cp", 40),
                       progress=lambda d, t: seen.append(d))
    assert seen[0] == 48 and meta["timing"]["resumed_from"] == 48
    assert meta["timing"]["scoring"]["images"] == meta["counts"]["scored_tiles"] - 48
    for name in COMPARED:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    other = Checkpoint(tmp_path / "cp", 40)
    score_slide(path_model, slide, tmp_path / "other", SlideOptions(tissue="none", batch_size=8), checkpoint=other)
    assert other.resumed_from == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env={**env, "GSA_PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def _tiles_scored(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith('gsa_job_tiles_scored_total{kind="slide"}'))


def test_sigkilled_server_resumes_from_its_checkpoint(path_model_repo, path_model, data_dir, tmp_path):
    """``python -m service`` SIGKILLed once a slide job is past half; restarted, it resumes from the last
    checkpoint (at most one interval of tiles scored again) and writes the files of an uninterrupted run."""
    every, options = 64, {"tissue": "none", "batch_size": 16}
    env = {**os.environ, "GSA_MODEL_DIR": str(path_model_repo), "GSA_JOBS_DIR": str(tmp_path / "jobs"),
           "GSA_DATA_DIR": str(data_dir), "GSA_INTRA_OP_THREADS": "1", "GSA_WARMUP": "false",
           "GSA_JOB_CHECKPOINT_TILES": str(every), "GSA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    proc = _serve(env, port)
    url = f"http://127.0.0.1:{port}"
    try:
        job = httpx.post(f"{url}/v1/jobs/slides", json={"model": PATH_MODEL, "path": "synthetic.tiff",
                                                         "options": options}).json()
        deadline = time.monotonic() + 300
        while True:
            seen = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            assert seen["state"] not in FINISHED and time.monotonic() < deadline, seen
            if seen["progress"]["total"] and seen["progress"]["done"] > seen["progress"]["total"] / 2:
                break
            time.sleep(0.02)
        scored_before = _tiles_scored(url)  # counted per batch: at most the tiles done at the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    total = seen["progress"]["total"]

    proc = _serve(env, port := _free_port())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while (final := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["state"] not in FINISHED:
            assert time.monotonic() < deadline, final
            time.sleep(0.1)
        tiles_now = _tiles_scored(url)
        results = {name: httpx.get(f"{url}/v1/jobs/{job['id']}/results/{name}").content
                   for name in (*COMPARED, "metadata.json")}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert final["state"] == "succeeded" and final["attempts"] == 2, final
    resumed = final["progress"]["resumed_from"]
    print(f"tiles {total}, scored before the kill >= {scored_before:.0f}, resumed from {resumed}, "
          f"scored again >= {scored_before - resumed:.0f}, scored after restart {tiles_now:.0f}, interval {every}")
    assert resumed % every == 0 and resumed > total / 2 - every and 0 <= scored_before - resumed < every
    assert tiles_now == total - resumed

    score_slide(path_model, data_dir / "synthetic.tiff", tmp_path / "ref", SlideOptions(**options))
    for name in COMPARED:
        assert results[name] == (tmp_path / "ref" / name).read_bytes(), name
    meta, ref = json.loads(results["metadata.json"]), json.loads((tmp_path / "ref" / "metadata.json").read_text())
    for m in (meta, ref):
        m.pop("timing")
    assert meta == ref


def test_two_server_processes_share_one_jobs_directory(path_model_repo, path_model, data_dir, tmp_path):
    """Two ``python -m service`` processes on one jobs directory: four slide jobs submitted to the first
    are each run exactly once (one attempt), both processes run some of them, both list all four, and
    every job's files equal the single-machine scorer's."""
    options = {"tissue": "none", "batch_size": 16}
    env = {**os.environ, "GSA_MODEL_DIR": str(path_model_repo), "GSA_JOBS_DIR": str(tmp_path / "jobs"),
           "GSA_DATA_DIR": str(data_dir), "GSA_INTRA_OP_THREADS": "1", "GSA_WARMUP": "false",
           "GSA_JOB_POLL_S": "0.2", "GSA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    procs, urls = [], []
    try:
        for _ in range(2):
            port = _free_port()
            procs.append(_serve(env, port))
            urls.append(f"http://127.0.0.1:{port}")
        ids = [httpx.post(f"{urls[0]}/v1/jobs/slides", json={"model": PATH_MODEL, "path": "synthetic.tiff",
                                                               "options": options}).json()["id"] for _ in range(4)]
        deadline = time.monotonic() + 300
        while (jobs := [httpx.get(f"{urls[1]}/v1/jobs/{i}").json() for i in ids]) and \
                any(j["state"] not in FINISHED for j in jobs):
            assert time.monotonic() < deadline, jobs
            time.sleep(0.2)
        tiles = [_tiles_scored(url) for url in urls]
        listed = [{j["id"] for j in httpx.get(f"{url}/v1/jobs?limit=50").json()["jobs"]} for url in urls]
        results = {i: httpx.get(f"{urls[0]}/v1/jobs/{i}/results/tiles.csv").content for i in ids}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    assert [(j["state"], j["attempts"]) for j in jobs] == [("succeeded", 1)] * 4, jobs
    total = jobs[0]["progress"]["total"]
    print(f"tiles scored by each process: {tiles} (4 jobs of {total})")
    assert sum(tiles) == 4 * total and min(tiles) >= total  # each job once; each process ran at least one
    assert listed == [set(ids), set(ids)]
    score_slide(path_model, data_dir / "synthetic.tiff", tmp_path / "ref", SlideOptions(**options))
    reference = (tmp_path / "ref" / "tiles.csv").read_bytes()
    assert all(content == reference for content in results.values())


def test_old_job_files_are_imported_once(jobs_client, data_dir, tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / ("a" * 32)).mkdir(parents=True)
    old = {"id": "a" * 32, "kind": "slide", "model": PATH_MODEL, "version": None, "state": "succeeded",
           "input": {"path": str(data_dir / "synthetic.tiff"), "uploaded": False, "name": "synthetic.tiff"},
           "options": {}, "created_at": 5.0, "results": []}
    (jobs / ("a" * 32) / "job.json").write_text(json.dumps(old))
    client = jobs_client()
    listed = client.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == ["a" * 32] and listed[0]["input"]["path"] == "synthetic.tiff"
    assert (jobs / ("a" * 32) / "job.json.imported").is_file() and not (jobs / ("a" * 32) / "job.json").exists()
