"""The dynamic batcher: merging, splitting, bounded queue (429), timeouts (503), failures and
draining on shutdown; unit-level with a stand-in session, then over HTTP with the real model."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import TINY, LiveServer, make_settings
from service.batcher import DynamicBatcher, InferenceFailed
from service.errors import DeadlineUnmet, Overloaded, PayloadTooLarge, RequestTimeout, Unavailable
from service.metrics import ServiceMetrics
from service.settings import BatchingSettings
from service.stats import ModelStats


class FakeSession:
    """Echoes its input (so that each request can check it got its own rows back), records batch
    sizes, and takes ``delay_s`` per run."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[int] = []
        self.contents: list[list[int]] = []  # the first pixel of each image of each batch
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.gate.wait(5)
        self.batches.append(len(images))
        self.contents.append(images[:, 0, 0, 0].tolist())
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("boom")
        return {"echo": images.reshape(len(images), -1)[:, :1].astype(np.float32)}


def _batcher(session: FakeSession, in_flight=None, seconds_per_image: float = 0.0, **config) -> DynamicBatcher:
    cfg = BatchingSettings(**{"max_batch_size": 4, "max_queue_delay_ms": 20, "max_queue_size": 64, **config})
    return DynamicBatcher("m", "1", session, cfg, ModelStats("m", "1"), ServiceMetrics(), in_flight, seconds_per_image)


def _req(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 1), value, np.uint8)


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_merged_and_routed_back():
    session = FakeSession(delay_s=0.01)

    async def main():
        b = _batcher(session)
        b.start()
        outs = await asyncio.gather(*(b.infer(_req(i), 5) for i in range(10)))
        await b.close()
        return outs

    outs = _run(main())
    assert [int(o["echo"][0, 0]) for o in outs] == list(range(10))
    assert sum(session.batches) == 10 and max(session.batches) == 4 and len(session.batches) <= 4


@pytest.mark.parametrize("others", [0, 1])
def test_a_lone_request_does_not_wait_for_company(others):
    """With nobody else in the server the batch runs at once; with one more request in flight
    (still being parsed, say) it waits up to the queue delay for it."""
    session = FakeSession()

    async def main():
        b = _batcher(session, in_flight=lambda: 1 + others, max_queue_delay_ms=300)
        b.start()
        t0 = time.perf_counter()
        await b.infer(_req(0), 5)
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    elapsed = _run(main())
    assert (elapsed < 0.15) if others == 0 else (0.29 < elapsed < 1.0), elapsed


def test_batching_off_runs_each_request_alone():
    session = FakeSession(delay_s=0.005)

    async def main():
        b = _batcher(session, enabled=False)
        b.start()
        await asyncio.gather(*(b.infer(_req(i, n=2), 5) for i in range(5)))
        await b.close()

    _run(main())
    assert session.batches == [2] * 5


def test_a_large_request_is_split_and_reassembled_in_order():
    session = FakeSession()

    async def main():
        b = _batcher(session)
        b.start()
        images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(2, 1).repeat(2, 2)
        out = await b.infer(images, 5)
        await b.close()
        return out

    out = _run(main())
    assert out["echo"][:, 0].tolist() == list(range(10))
    assert sorted(session.batches) == [2, 4, 4]


def test_full_queue_answers_overloaded_with_retry_after():
    session = FakeSession()
    session.gate.clear()  # the first batch blocks in the session: the queue fills up behind it

    async def main():
        b = _batcher(session, max_queue_size=3, max_batch_size=1, max_queue_delay_ms=0)
        b.start()
        first = asyncio.ensure_future(b.infer(_req(0), 5))
        await asyncio.sleep(0.05)  # taken by the worker, blocked
        queued = [asyncio.ensure_future(b.infer(_req(i), 5)) for i in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as err:
            await b.infer(_req(9), 5)
        with pytest.raises(PayloadTooLarge):
            await b.infer(_req(9, n=4), 5)  # could never fit
        session.gate.set()
        await asyncio.gather(first, *queued)
        await b.close()
        return err.value

    err = _run(main())
    assert err.status == 429 and int(err.headers["Retry-After"]) >= 1


def test_request_waiting_past_its_timeout_is_dropped():
    session = FakeSession(delay_s=0.3)

    async def main():
        b = _batcher(session, max_batch_size=1, max_queue_delay_ms=0)
        b.start()
        slow = asyncio.ensure_future(b.infer(_req(0), 5))
        await asyncio.sleep(0.02)
        with pytest.raises(RequestTimeout):
            await b.infer(_req(1), 0.05)  # queued behind a 0.3 s run
        await slow
        await b.close()

    _run(main())
    assert session.batches == [1]  # the abandoned request never reached the session


def test_session_failure_fails_the_batch_and_the_batcher_goes_on():
    session = FakeSession(fail=True)

    async def main():
        b = _batcher(session)
        b.start()
        with pytest.raises(InferenceFailed, match="boom"):
            await b.infer(_req(0), 5)
        session.fail = False
        out = await b.infer(_req(7), 5)
        await b.close()
        return out

    assert int(_run(main())["echo"][0, 0]) == 7


def test_close_finishes_queued_requests_then_refuses_new_ones():
    session = FakeSession(delay_s=0.02)

    async def main():
        b = _batcher(session, max_batch_size=2)
        b.start()
        pending = [asyncio.ensure_future(b.infer(_req(i), 5)) for i in range(6)]
        await asyncio.sleep(0)
        await b.close()
        assert sum(session.batches) == 6  # every queued request ran before close returned
        outs = await asyncio.gather(*pending)
        with pytest.raises(Unavailable):
            await b.infer(_req(0), 5)
        return outs

    outs = _run(main())
    assert [int(o["echo"][0, 0]) for o in outs] == list(range(6))


def test_requests_are_served_round_robin():
    """A request that does not fit one batch goes to the back of the round with its other images:
    later requests are served between its batches, and batches are filled across requests."""
    session = FakeSession()
    session.gate.clear()

    async def main():
        b = _batcher(session, max_batch_size=2, max_queue_delay_ms=0)
        b.start()
        a = asyncio.ensure_future(b.infer(_req(1, n=6), 5))
        await asyncio.sleep(0.05)  # A's first 2 images are taken and blocked in the session
        others = [asyncio.ensure_future(b.infer(_req(2, n=2), 5)), asyncio.ensure_future(b.infer(_req(3), 5))]
        await asyncio.sleep(0.01)
        session.gate.set()
        outs = await asyncio.gather(a, *others)
        await b.close()
        return outs

    outs = _run(main())
    # FIFO by parts would be [1,1] [1,1] [1,1] [2,2] [3]: the 1-image request last
    assert session.contents == [[1, 1], [1, 1], [2, 2], [3, 1], [1]]
    assert [o["echo"][:, 0].tolist() for o in outs] == [[1.0] * 6, [2.0] * 2, [3.0]]


def test_admission_refuses_what_cannot_finish_in_time():
    session = FakeSession(delay_s=0.2)

    async def main():
        b = _batcher(session, max_batch_size=2, max_queue_delay_ms=0, seconds_per_image=0.1)
        b.start()
        running = asyncio.ensure_future(b.infer(_req(0, n=8), 5))  # 8 images at 0.1 s each
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineUnmet) as late:
            await b.infer(_req(1, n=2), 0.4)  # (2 of A in turn + 2 ours) x 0.1 s + what is left of the running 2 > 0.4 s
        with pytest.raises(PayloadTooLarge, match="split it"):
            await b.infer(_req(1, n=8), 0.4)  # 0.8 s even alone
        with pytest.raises(RequestTimeout, match="decoding"):
            await b.infer(_req(1), 1.0, started=time.perf_counter() - 2.0)  # decoding took the whole timeout
        ok = await b.infer(_req(5), 5)  # within its deadline: admitted
        await running
        await b.close()
        return late.value, ok

    late, ok = _run(main())
    assert late.status == 503 and int(late.headers["Retry-After"]) >= 1 and "cannot finish" in late.message
    assert int(ok["echo"][0, 0]) == 5


def test_admission_counts_the_rounds_of_a_large_request():
    """A request served over several rounds waits for every other queued request once a round (their
    clients send again as they finish): refused when the rounds cannot fit its deadline, although
    its images plus those queued now would; a 1-image request beside the same queue is admitted."""
    session = FakeSession()
    session.gate.clear()

    async def main():
        b = _batcher(session, max_batch_size=2, max_queue_delay_ms=0, seconds_per_image=0.1)
        b.start()
        blocker = asyncio.ensure_future(b.infer(_req(0, n=2), 5))  # taken, held in the session
        await asyncio.sleep(0.05)
        small = [asyncio.ensure_future(b.infer(_req(i), 5)) for i in range(1, 5)]  # 4 queued, 1 image each
        await asyncio.sleep(0.01)
        # 6 images in 3 rounds of 2: (3 x 4 queued + 6) x 0.1 s = 1.8 s (+ the running 2) > 1.5 s,
        # where counting the queue once would say (4 + 6) x 0.1 s = 1.0 s
        with pytest.raises(DeadlineUnmet, match="3 round"):
            await b.infer(_req(9, n=6), 1.5)
        one = asyncio.ensure_future(b.infer(_req(7), 1.5))  # (4 + 1) x 0.1 s: admitted
        await asyncio.sleep(0.01)
        session.gate.set()
        outs = await asyncio.gather(blocker, *small, one)
        await b.close()
        return outs

    outs = _run(main())
    assert [int(o["echo"][0, 0]) for o in outs] == [0, 1, 2, 3, 4, 7]


def test_busy_cost_per_image_is_measured_only_while_work_waits():
    """The wall time between batch starts counts as the cost of the images while the queue never ran
    dry; an interval with idle time in it (no request for a while) is not taken for slowness."""
    session = FakeSession(delay_s=0.05)

    async def main():
        b = _batcher(session, max_batch_size=2, max_queue_delay_ms=0)
        b.start()
        await b.infer(_req(1, n=8), 5)  # 4 batches of 2 back to back: about 25 ms an image
        busy = b._busy_per_image
        await asyncio.sleep(1.5)
        await b.infer(_req(2, n=2), 5)  # after 1.5 s of nothing: not a 0.75 s-an-image sample
        after = b._busy_per_image
        await b.close()
        return busy, after

    busy, after = _run(main())
    assert 0.02 <= busy < 0.1 and after < 0.1


# ---- over HTTP, with the real model -------------------------------------------------------
def _slow_down(server, seconds: float) -> None:
    """Make every session run of the default tiny version take ``seconds`` longer."""
    batcher = server.app.state.server.get(TINY).batcher
    real = batcher._run

    def slow(images):
        time.sleep(seconds)
        return real(images)

    batcher._run = slow


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_http_overload_429_and_timeout_503(model_repo):
    settings = make_settings(
        model_repo, request_timeout_s=0.5,
        batching=BatchingSettings(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2),
    )
    with LiveServer(settings) as server:
        _slow_down(server, 0.3)

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                return await asyncio.gather(*(
                    client.post(f"/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"})
                    for _ in range(6)
                ))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and 503 in codes, codes
        overloaded = next(r for r in responses if r.status_code == 429)
        assert int(overloaded.headers["retry-after"]) >= 1 and "overloaded" in overloaded.json()["error"]
        timed_out = next(r for r in responses if r.status_code == 503)
        assert "timed out" in timed_out.json()["error"]
        # the server goes on serving, once the batches of the abandoned requests are done
        time.sleep(0.35)
        r = httpx.post(f"{server.url}/v1/models/{TINY}/predict", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'gsa_inference_requests_total{{model="{TINY}",outcome="overloaded",version="2"}}' in metrics
        assert f'gsa_inference_requests_total{{model="{TINY}",outcome="timeout",version="2"}}' in metrics


def test_http_concurrent_requests_are_batched(model_repo):
    settings = make_settings(model_repo, batching=BatchingSettings(max_batch_size=8, max_queue_delay_ms=50))
    with LiveServer(settings) as server:
        images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                return await asyncio.gather(*(
                    client.post(f"/v2/models/{TINY}/infer", json={"inputs": [
                        {"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": images[i].ravel().tolist()}
                    ]}) for i in range(8)
                ))

        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses)
        stats = httpx.get(f"{server.url}/v2/models/{TINY}/versions/2/stats").json()["model_stats"][0]
        assert stats["inference_count"] == 8 and stats["execution_count"] < 8
        # each request got its own image's outputs
        single = httpx.post(f"{server.url}/v2/models/{TINY}/infer", json={"inputs": [
            {"name": "image", "datatype": "UINT8", "shape": [1, 16, 16, 1], "data": images[5].ravel().tolist()}]}).json()
        assert responses[5].json()["outputs"][0]["data"] == pytest.approx(single["outputs"][0]["data"], rel=1e-5, abs=1e-5)


def test_http_a_small_request_is_served_while_a_maximal_one_runs(model_repo):
    """Round-robin over HTTP: with every session run slowed to 50 ms, a 1-image request sent while a
    64-image request (16 batches of 4) runs finishes after a batch or two, not after all 16."""
    settings = make_settings(model_repo, max_images_per_request=64,
                             batching=BatchingSettings(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=128))
    with LiveServer(settings) as server:
        _slow_down(server, 0.05)
        big = np.zeros((64, 16, 16, 1), np.uint8)

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                async def timed(coro):
                    t0 = time.perf_counter()
                    r = await coro
                    return r, time.perf_counter() - t0

                large = asyncio.ensure_future(timed(client.post(f"/v2/models/{TINY}/infer", json={"inputs": [
                    {"name": "image", "datatype": "UINT8", "shape": list(big.shape), "data": big.ravel().tolist()}]})))
                await asyncio.sleep(0.25)  # the large request is being computed
                small = await timed(client.post(f"/v1/models/{TINY}/predict", content=_png(),
                                                headers={"content-type": "image/png"}))
                return await large, small

        (large, large_s), (small, small_s) = asyncio.run(scenario())
        assert large.status_code == 200 and small.status_code == 200, (large.text, small.text)
        print(f"latency: 64-image request {large_s:.3f} s, 1-image request {small_s:.3f} s")
        assert large_s > 0.8  # 16 runs of 50 ms at least
        assert small_s < 0.35 * large_s, (small_s, large_s)


def test_warm_up_speed_is_checked_against_the_limits(model_repo, app_client):
    """A maximal request that cannot meet the timeout at the warm-up's speed is logged at start-up."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("service").addHandler(handler)
    try:
        app_client(request_timeout_s=1e-6, max_images_per_request=256)
    finally:
        logging.getLogger("service").removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("a request of 256 images" in m and "GSA_REQUEST_TIMEOUT_S" in m for m in messages), messages
