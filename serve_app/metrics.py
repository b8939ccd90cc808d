"""The service's metrics, through Ray Serve's metrics API, exported on Ray's Prometheus endpoint.

Ray prefixes every name with `ray_` and exports a counter `x` as `ray_x_total`; Serve adds the
`deployment`, `replica` and `application` tags. Each metric object is created on its first use, in
the replica that records it: Serve reads those tags from the replica context at creation time.
Recording costs a call into Ray's core worker, so callers record once per request or chunk, and a
model replica records its engine's state once a second.
"""

from __future__ import annotations

import functools
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from chatterbox.engine import EngineStats

_LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# Real-time factor: seconds of compute per second of audio (below 1: faster than real time).
_RTF_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]


AUDIO_SECONDS = "chatterbox_audio_seconds"
CHUNK_REAL_TIME_FACTOR = "chatterbox_chunk_real_time_factor"
CHUNK_QUEUE_SECONDS = "chatterbox_chunk_queue_seconds"
ENGINE_LIVE_ROWS = "chatterbox_engine_live_rows"
ENGINE_QUEUE_DEPTH = "chatterbox_engine_queue_depth"
DECODE_STEPS = "chatterbox_decode_steps"
PREFIX_CACHE_LOOKUPS = "chatterbox_prefix_cache_lookups"
TIME_TO_FIRST_AUDIO = "chatterbox_time_to_first_audio_seconds"
VOICE_CACHE_LOOKUPS = "chatterbox_voice_cache_lookups"
REFUSALS = "chatterbox_refusals"

# name -> (kind, description, options): the one definition of every metric.
_METRICS: dict[str, tuple[type[Counter | Gauge | Histogram], str, dict[str, Any]]] = {
    AUDIO_SECONDS: (
        Counter,
        "Seconds of audio synthesised by the model replicas (chunks, whole or streamed, before stitching).",
        {},
    ),
    CHUNK_REAL_TIME_FACTOR: (
        Histogram,
        "A chunk's time in its replica's engine (queue, decode, vocoder) over its audio seconds.",
        {"boundaries": _RTF_BUCKETS},
    ),
    CHUNK_QUEUE_SECONDS: (
        Histogram,
        "Time a chunk waited in its model replica's engine for a free KV-cache slot.",
        {"boundaries": _LATENCY_BUCKETS_S},
    ),
    ENGINE_LIVE_ROWS: (
        Gauge,
        "Chunks a model replica's engine is decoding now (its busy KV-cache slots).",
        {},
    ),
    ENGINE_QUEUE_DEPTH: (Gauge, "Chunks waiting in a model replica's engine for a free slot.", {}),
    DECODE_STEPS: (Counter, "Batched T3 decode steps the model replicas' engines ran.", {}),
    PREFIX_CACHE_LOOKUPS: (
        Counter,
        "Chunks admitted to an engine slot, by whether their voice's prompt K/V was cached (hit, miss).",
        {"tag_keys": ("result",)},
    ),
    TIME_TO_FIRST_AUDIO: (
        Histogram,
        "From the ingress accepting a request to its first chunk's audio being ready.",
        {"boundaries": _LATENCY_BUCKETS_S},
    ),
    VOICE_CACHE_LOOKUPS: (
        Counter,
        "Reference voices looked up in a model replica's voice cache, by result (hit, miss).",
        {"tag_keys": ("result",)},
    ),
    REFUSALS: (
        Counter,
        "Requests the ingress refused or failed (HTTP and handle API), by error code and status.",
        {"tag_keys": ("code", "status")},
    ),
}


@functools.cache
def _metric(name: str) -> Any:
    """The metric object of ``name``, created once per process (in the replica that records it)."""
    kind, description, options = _METRICS[name]
    return kind(name, description=description, **options)


def record_chunk_synthesised(
    audio_seconds: float, queue_seconds: float | None, engine_seconds: float
) -> None:
    """A chunk of `audio_seconds` that spent `engine_seconds` of wall time in its replica's engine,
    `queue_seconds` of them waiting for a slot (None: the engine no longer knows)."""
    if queue_seconds is not None:
        _metric(CHUNK_QUEUE_SECONDS).observe(queue_seconds)
    if audio_seconds > 0:  # Ray refuses to add 0 to a counter
        _metric(AUDIO_SECONDS).inc(audio_seconds)
        _metric(CHUNK_REAL_TIME_FACTOR).observe(engine_seconds / audio_seconds)


def record_engine_stats(now: EngineStats, before: EngineStats) -> None:
    """A replica engine's gauges now, and what its counters added since `before` (the last record)."""
    if now == before:
        return
    _metric(ENGINE_LIVE_ROWS).set(now.live_rows)
    _metric(ENGINE_QUEUE_DEPTH).set(now.queue_depth)
    if steps := now.steps - before.steps:
        _metric(DECODE_STEPS).inc(steps)
    if hits := now.prefix_hits - before.prefix_hits:
        _metric(PREFIX_CACHE_LOOKUPS).inc(hits, tags={"result": "hit"})
    if misses := now.prefix_misses - before.prefix_misses:
        _metric(PREFIX_CACHE_LOOKUPS).inc(misses, tags={"result": "miss"})


def record_voice_cache_lookups(hits: int, misses: int) -> None:
    if hits:
        _metric(VOICE_CACHE_LOOKUPS).inc(hits, tags={"result": "hit"})
    if misses:
        _metric(VOICE_CACHE_LOOKUPS).inc(misses, tags={"result": "miss"})


def record_time_to_first_audio(seconds: float) -> None:
    _metric(TIME_TO_FIRST_AUDIO).observe(seconds)


def record_refusal(code: str, status: int) -> None:
    _metric(REFUSALS).inc(tags={"code": code, "status": str(status)})
