"""Slide archives (``service/distributed/archive.py``): listing a folder, glob or CSV manifest, and
scoring on a real local Ray cluster started here (2 CPUs, every connection on loopback): the same
files byte for byte as the single-machine scorer, a corrupt slide reported while the run goes on,
a run interrupted and started again that skips the finished slides, a run cancelled from another
thread (in this process, and on Ray where its actors are killed), and the CLI.

Ray is the optional ``distributed`` extra: without it the Ray tests skip, except under CI (``CI``
set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from data_paths import SLIDE, data_path
from loopback import descendants, sockets_off_loopback
from scoring_fixtures import PATH_MODEL

from service.distributed.archive import (
    DONE_FILE,
    SUMMARY_FILE,
    ArchiveItem,
    finished,
    list_archive,
    score_archive,
)
from service.scoring.scoring_errors import Cancelled, ScoringError
from service.scoring.slide_scoring import SlideOptions, score_slide

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("tiles.csv", "tiles.geojson", "heatmap.npy", "heatmap.png")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs, bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``:
    without it Ray on Linux also connects to the machine's primary address)."""
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: set it before
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed (CI installs the 'distributed' extra: scripts/test.sh)")
        pytest.skip("ray is not installed: pip install -e '.[distributed]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


@pytest.fixture(scope="module")
def archive(synthetic_slides, tmp_path_factory) -> Path:
    """Two synthetic pyramidal TIFFs (one in a sub-folder), the real SVS when the data is there, and a
    corrupt 'slide'."""
    root = tmp_path_factory.mktemp("archive")
    shutil.copy(synthetic_slides["slide"], root / "a.tiff")
    (root / "case2").mkdir()
    shutil.copy(synthetic_slides["rotated"], root / "case2" / "b.tiff")
    if data_path(SLIDE).is_file():
        shutil.copy(data_path(SLIDE), root / "real.svs")
    (root / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    (root / "notes.txt").write_text("not a slide\n")
    return root


def _pid_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"):
            return True
        time.sleep(0.1)
    return False


def test_list_archive_folder_glob_and_manifest(archive, tmp_path):
    assert list_archive(archive) == [ArchiveItem("a", archive / "a.tiff"), ArchiveItem("broken", archive / "broken.svs"),
                                     ArchiveItem("case2/b", archive / "case2" / "b.tiff"),
                                     *([ArchiveItem("real", archive / "real.svs")] if (archive / "real.svs").exists() else [])]
    assert [i.name for i in list_archive(f"{archive}/**/*.tiff")] == ["a", "b"]
    manifest = archive / "manifest.csv"
    manifest.write_text("path,name\na.tiff,first\ncase2/b.tiff,\n")
    assert list_archive(manifest) == [ArchiveItem("first", archive / "a.tiff"), ArchiveItem("case2/b", archive / "case2" / "b.tiff")]
    for text, error in (("slide\na.tiff\n", "needs a 'path' column"), ("path,name\na.tiff,x\ncase2/b.tiff,x\n", "same output folder: x"),
                        ("path,name\na.tiff,../up\n", "without '..'"), ("path\n\n,\n", "empty path")):
        (tmp_path / "m.csv").write_text(text)
        with pytest.raises(ScoringError, match=error):
            list_archive(tmp_path / "m.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoringError, match="no slides found"):
        list_archive(tmp_path / "empty")
    with pytest.raises(ScoringError, match="not a folder, a glob pattern or a .csv manifest"):
        list_archive(tmp_path / "missing")


def test_archive_on_ray_equals_the_single_machine_scorer_and_resumes(ray_cluster, archive, path_model_repo, path_model,
                                                                     tmp_path):
    options = SlideOptions(batch_size=32, stride=32)  # every other tile each way: a quarter of the tiles, same code
    out = tmp_path / "out"
    seen: list[dict] = []

    class Interrupt(Exception):
        pass

    def stop_after_first(record, done, total):
        seen.append(record)
        if record["status"] == "done":
            raise Interrupt  # the driver stops (as on Ctrl-C): the actors are killed with it

    with pytest.raises(Interrupt):
        score_archive(archive, out, model_dir=path_model_repo, model=PATH_MODEL, options=options,
                      ray_address="local", workers=2, threads=1, progress=stop_after_first)
    first = seen[-1]["name"]
    sealed = {p.parent.relative_to(out).as_posix() for p in out.rglob(DONE_FILE)}
    assert first in sealed and len(sealed) < 3  # (a second slide may have finished as the run stopped)

    # a damaged result file un-finishes its slide: it is scored again
    names = [item.name for item in list_archive(archive)]
    damaged = first
    (out / damaged / "tiles.csv").write_text("damaged\n")
    summary = score_archive(archive, out, model_dir=path_model_repo, model=PATH_MODEL, options=options,
                            ray_address="local", workers=2, threads=1)
    assert summary["slides"] == len(names)
    assert set(summary["skipped_slides"]) == sealed - {damaged} and summary["skipped"] == len(sealed - {damaged})
    assert [f["name"] for f in summary["failed"]] == ["broken"]
    assert "broken.svs" in summary["failed"][0]["error"]
    good = [n for n in names if n != "broken"]
    assert summary["done"] + summary["skipped"] == len(good)
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert {r["pid"] for r in summary["per_slide"] if r["status"] == "done"} - {os.getpid()}, "scored outside the driver"

    for item in list_archive(archive):
        if item.name == "broken":
            continue
        ref = tmp_path / "ref" / item.name
        meta = score_slide(path_model, item.path, ref, options)
        for name in COMPARED:
            assert (out / item.name / name).read_bytes() == (ref / name).read_bytes(), (item.name, name)
        got = json.loads((out / item.name / "metadata.json").read_text())
        for m in (got, meta):
            m.pop("timing")
        assert got == meta
    # finished is bound to the model and the options: other options would score everything again
    stamp = json.loads((out / "a" / DONE_FILE).read_text())
    assert finished(out / "a", {k: stamp[k] for k in ("model", "options")})
    assert not finished(out / "a", {"model": stamp["model"], "options": {**stamp["options"], "min_tissue": 0.25}})

    # every connection of this process and of the Ray processes it started is on loopback
    assert sockets_off_loopback({os.getpid()} | descendants(os.getpid())) == []


def _cancel_after_first_done(cancel: threading.Event, seen: list[dict]):
    def progress(record, done, total):
        seen.append(record)
        if record["status"] == "done":
            cancel.set()
    return progress


def test_cancel_stops_a_run_in_this_process(archive, path_model_repo, tmp_path):
    """``cancel`` set after the first slide: Cancelled, no summary, that slide sealed and no other;
    started again, the run skips it."""
    options, out, cancel, seen = SlideOptions(batch_size=32, stride=32), tmp_path / "out", threading.Event(), []
    with pytest.raises(Cancelled):
        score_archive(archive, out, model_dir=path_model_repo, model=PATH_MODEL, options=options, threads=1,
                      progress=_cancel_after_first_done(cancel, seen), cancel=cancel)
    first = next(r["name"] for r in seen if r["status"] == "done")
    assert {p.parent.relative_to(out).as_posix() for p in out.rglob(DONE_FILE)} == {first}
    assert not (out / SUMMARY_FILE).exists()
    summary = score_archive(archive, out, model_dir=path_model_repo, model=PATH_MODEL, options=options, threads=1)
    assert summary["skipped_slides"] == [first]


def _busy_actor(root: int) -> int | None:
    """The pid of a Ray worker under ``root`` that is running ``SlideWorker.score`` (Ray names the
    process after the task it runs)."""
    for pid in descendants(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::SlideWorker.score"):
            return pid
    return None


def test_cancel_on_ray_kills_the_actors(ray_cluster, archive, path_model_repo, tmp_path):
    """On Ray, ``cancel`` set from another thread while an actor scores a slide ends the run with
    Cancelled within a moment and kills the actor: its process is gone, and no slide is sealed."""
    options = SlideOptions(batch_size=2, stride=16)  # a few seconds a slide: caught mid-slide
    cancel, busy = threading.Event(), []

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not cancel.is_set() and time.monotonic() < deadline:
            pid = _busy_actor(os.getpid())
            if pid is not None:
                busy.append(pid)
                cancel.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with pytest.raises(Cancelled):
        score_archive(archive, tmp_path / "out", model_dir=path_model_repo, model=PATH_MODEL, options=options,
                      ray_address="local", workers=1, threads=1, cancel=cancel)
    stopped = time.monotonic()
    watcher.join()
    assert busy, "no actor was seen scoring: the test would prove nothing"
    assert ray_cluster.is_initialized(), "a connection opened by the caller is left open"
    assert _pid_gone(busy[0], 30), f"actor process {busy[0]} still runs after the cancel"
    assert time.monotonic() - stopped < 30
    assert list((tmp_path / "out").rglob(DONE_FILE)) == []


def test_actors_that_cannot_start_fail_the_run_in_bounded_time(ray_cluster, archive, path_model_repo, tmp_path):
    """Actors asking for more CPUs than the cluster has are never placed: the run fails after
    ``start_timeout_s`` with a message that says why, instead of waiting for ever; nothing is sealed,
    and no CPU is left held."""
    t0 = time.monotonic()
    with pytest.raises(ScoringError, match=r"1 of 1 Ray workers did not start within 3 s: does the cluster have 3 free CPU"):
        score_archive(archive, tmp_path / "out", model_dir=path_model_repo, model=PATH_MODEL, ray_address="local",
                      workers=1, threads=3, start_timeout_s=3)
    assert 3 <= time.monotonic() - t0 < 30
    assert list((tmp_path / "out").rglob(DONE_FILE)) == []
    assert ray_cluster.available_resources().get("CPU") == 2  # nothing placed, nothing held


def test_cli_slides_in_this_process(archive, path_model_repo, tmp_path):
    """``python -m service.score slides`` without Ray: exit status 1 with the corrupt slide named,
    the others scored; started again, nothing is scored twice."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,name\n{archive / 'a.tiff'},a\n{archive / 'broken.svs'},broken\n")
    cmd = [sys.executable, "-m", "service.score", "slides", str(manifest), "--model", PATH_MODEL, "--model-dir",
           str(path_model_repo), "--out", str(tmp_path / "out"), "--threads", "1", "--batch-size", "16"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "1 slides scored, 0 already done, 1 failed of 2" in run.stdout and "failed: broken:" in run.stderr
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "0 slides scored, 1 already done, 1 failed of 2" in run.stdout
