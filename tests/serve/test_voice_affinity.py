"""Voice affinity on a real local Serve: an application with two model replicas beside the session's,
with and without `voice_affinity`. Which replica ran each chunk is read off the replicas' own
prefix-cache counters on Ray's metrics endpoint (labelled by replica), as an operator would."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs
from tests.serve.conftest import CHUNK_MAX_NEW_TOKENS, voice_wav
from tests.serve.test_metrics import EXPORT_TIMEOUT_S, PREFIX_CACHE_LOOKUPS, scrape

MAX_BATCH_SIZE = 2  # so a burst of a few requests saturates a replica


@contextmanager
def two_replica_app(serve_app, name: str, voice_affinity: bool) -> Iterator[str]:
    """An application with two model replicas, deployed beside the session's; yields its URL."""
    args = AppArgs(
        model="tiny",
        tiny_cache_dir=serve_app.args.tiny_cache_dir,
        device="cpu",
        model_num_cpus=0,
        max_batch_size=MAX_BATCH_SIZE,
        max_new_tokens=CHUNK_MAX_NEW_TOKENS,
        watermark=False,
        voice_affinity=voice_affinity,
        autoscaling={"min_replicas": 2, "max_replicas": 2},
        ingress={"num_cpus": 0},
        stitcher={"num_cpus": 0},
        shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
    )
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        yield f"{serve_app.url}/{name}"
    finally:
        serve.delete(name)


def lookups_by_replica(serve_app, app: str) -> dict[str, Counter[str]]:
    """The prefix-cache lookups (hit, miss) each model replica of `app` has exported."""
    found: dict[str, Counter[str]] = {}
    for sample in scrape(serve_app).samples:
        if sample.name == PREFIX_CACHE_LOOKUPS and sample.labels.get("application") == app:
            replica = found.setdefault(sample.labels["replica"], Counter())
            replica[sample.labels["result"]] += int(sample.value)
    return found


def settled_lookups(serve_app, app: str, chunks: int) -> dict[str, Counter[str]]:
    """`lookups_by_replica` once all `chunks` chunks sent to `app` so far show (Ray exports every
    few seconds)."""
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        found = lookups_by_replica(serve_app, app)
        total = sum(sum(counts.values()) for counts in found.values())
        assert total <= chunks, found
        if total == chunks:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(1.0)


async def synthesize(url: str, reference: str, count: int, concurrent: bool) -> None:
    """`count` one-chunk requests in `reference`'s voice, one after another or all at once."""
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int) -> None:
            body = {"text": f"Sentence number {i}.", "reference_audio_base64": reference, "seed": i}
            response = await client.post(f"{url}/v1/tts", json=body)
            assert response.status_code == 200, response.text
            assert len(response.json()["chunks"]) == 1

        if concurrent:
            await asyncio.gather(*(one(i) for i in range(count)))
        else:
            for i in range(count):
                await one(i)


def test_with_affinity_a_voice_stays_on_one_replica_until_that_one_is_saturated(serve_app):
    app = "affinity-on"
    reference = base64.b64encode(voice_wav(6.5)).decode()
    with two_replica_app(serve_app, app, voice_affinity=True) as url:
        asyncio.run(synthesize(url, reference, 6, concurrent=False))
        sequential = settled_lookups(serve_app, app, chunks=6)
        # One replica ran every chunk: it computed the voice's prompt K/V once and reused it.
        assert [dict(counts) for counts in sequential.values()] == [{"miss": 1, "hit": 5}]
        (preferred,) = sequential

        # Four at once: the preferred replica takes MAX_BATCH_SIZE, the rest spill to the other one.
        asyncio.run(synthesize(url, reference, 4, concurrent=True))
        burst = settled_lookups(serve_app, app, chunks=10)
        spilled = [replica for replica in burst if replica != preferred]
        assert len(spilled) == 1, burst
        assert burst[spilled[0]]["miss"] >= 1  # the other replica computed the voice itself


def test_without_affinity_a_voice_lands_on_both_replicas(serve_app):
    app = "affinity-off"
    reference = base64.b64encode(voice_wav(6.5)).decode()
    with two_replica_app(serve_app, app, voice_affinity=False) as url:
        # Serve's default router picks one of two idle replicas at random: all 16 on one has odds 2^-15.
        asyncio.run(synthesize(url, reference, 16, concurrent=False))
        spread = settled_lookups(serve_app, app, chunks=16)
        assert len(spread) == 2, spread
        # Each replica computed the voice's prompt K/V for its first chunk of it.
        assert all(counts["miss"] == 1 for counts in spread.values()), spread
