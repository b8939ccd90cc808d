"""The service's metrics, through Ray Serve's metrics API, exported on Ray's Prometheus endpoint.

Ray prefixes every name with `ray_` and exports a counter `x` as `ray_x_total`; Serve adds the
`deployment`, `replica` and `application` tags. Each metric object is created on its first use, in
the replica that records it: Serve reads those tags from the replica context at creation time.
Recording costs a call into Ray's core worker, so callers record once per request, batch or chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# Real-time factor: seconds of compute per second of audio (below 1: faster than real time).
_RTF_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
_BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


AUDIO_SECONDS = "chatterbox_audio_seconds"
CHUNK_REAL_TIME_FACTOR = "chatterbox_chunk_real_time_factor"
CHUNK_QUEUE_SECONDS = "chatterbox_chunk_queue_seconds"
BATCH_SIZE = "chatterbox_batch_size_chunks"
LIVE_BATCH_SIZE = "chatterbox_live_batch_size_chunks"
TIME_TO_FIRST_AUDIO = "chatterbox_time_to_first_audio_seconds"
VOICE_CACHE_LOOKUPS = "chatterbox_voice_cache_lookups"
REFUSALS = "chatterbox_refusals"

# name -> (kind, description, options): the one definition of every metric.
_METRICS: dict[str, tuple[type[Counter | Gauge | Histogram], str, dict[str, Any]]] = {
    AUDIO_SECONDS: (
        Counter,
        "Seconds of audio synthesised by the model replicas (chunks, before stitching).",
        {},
    ),
    CHUNK_REAL_TIME_FACTOR: (
        Histogram,
        "Generation time of the batch that synthesised a chunk over the chunk's audio seconds.",
        {"boundaries": _RTF_BUCKETS},
    ),
    CHUNK_QUEUE_SECONDS: (
        Histogram,
        "Time a chunk call waited in its model replica before its batch formed.",
        {"boundaries": _LATENCY_BUCKETS_S},
    ),
    BATCH_SIZE: (Histogram, "Chunks in each batch a model replica ran.", {"boundaries": _BATCH_SIZE_BUCKETS}),
    LIVE_BATCH_SIZE: (Gauge, "Chunks in the batch a model replica is running now (0 when idle).", {}),
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


def record_batch_started(queue_seconds: Sequence[float]) -> None:
    """A batch of `len(queue_seconds)` chunks starts; each waited that long since it was submitted."""
    for seconds in queue_seconds:
        _metric(CHUNK_QUEUE_SECONDS).observe(seconds)
    _metric(BATCH_SIZE).observe(len(queue_seconds))
    _metric(LIVE_BATCH_SIZE).set(len(queue_seconds))


def record_batch_finished() -> None:
    _metric(LIVE_BATCH_SIZE).set(0)


def record_chunks_synthesised(audio_seconds: Sequence[float], batch_seconds: float) -> None:
    """The chunks one batch synthesised in `batch_seconds` of wall time, by their audio seconds."""
    total = float(sum(audio_seconds))
    if total > 0:  # Ray refuses to add 0 to a counter
        _metric(AUDIO_SECONDS).inc(total)
    for seconds in audio_seconds:
        if seconds > 0:
            _metric(CHUNK_REAL_TIME_FACTOR).observe(batch_seconds / seconds)


def record_voice_cache_lookups(hits: int, misses: int) -> None:
    if hits:
        _metric(VOICE_CACHE_LOOKUPS).inc(hits, tags={"result": "hit"})
    if misses:
        _metric(VOICE_CACHE_LOOKUPS).inc(misses, tags={"result": "miss"})


def record_time_to_first_audio(seconds: float) -> None:
    _metric(TIME_TO_FIRST_AUDIO).observe(seconds)


def record_refusal(code: str, status: int) -> None:
    _metric(REFUSALS).inc(tags={"code": code, "status": str(status)})
