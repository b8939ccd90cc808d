"""The service's metrics, read from the Prometheus endpoint of the session's local Ray after real
traffic: a cloned voice twice (a voice-cache and engine prefix-cache miss, then a hit of each), a
refusal over HTTP and one over the handle API. Ray exports every few seconds, so the test polls
(bounded) until the traffic shows.

Counters are cumulative over the session, so it compares with a scrape taken before the traffic,
once whatever earlier tests recorded has been exported.
"""

import base64
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatterbox.constants import S3GEN_SR
from serve_app.errors import SynthesisError
from serve_app.schemas import SynthesisRequest
from tests.serve.conftest import CHUNK_MAX_NEW_TOKENS, voice_wav

EXPORT_TIMEOUT_S = 60.0
# Each process pushes its metrics this often (Ray's default metrics_report_interval_ms, 10 s).
EXPORT_INTERVAL_S = 10.0
# Ray prefixes our names with `ray_` and exports counters with `_total`.
AUDIO_SECONDS = "ray_chatterbox_audio_seconds_total"
REFUSALS = "ray_chatterbox_refusals_total"
VOICE_CACHE_LOOKUPS = "ray_chatterbox_voice_cache_lookups_total"
TIME_TO_FIRST_AUDIO = "ray_chatterbox_time_to_first_audio_seconds"
CHUNK_RTF = "ray_chatterbox_chunk_real_time_factor"
CHUNK_QUEUE = "ray_chatterbox_chunk_queue_seconds"
PREFIX_CACHE_LOOKUPS = "ray_chatterbox_prefix_cache_lookups_total"
DECODE_STEPS = "ray_chatterbox_decode_steps_total"
LIVE_ROWS = "ray_chatterbox_engine_live_rows"
QUEUE_DEPTH = "ray_chatterbox_engine_queue_depth"


class Scrape:
    """One read of the metrics endpoint: sums of samples by name and labels."""

    def __init__(self, text: str) -> None:
        families = text_string_to_metric_families(text)
        self.samples = [sample for family in families for sample in family.samples]

    def total(self, name: str, **labels: str) -> float:
        """Sum over every replica of the samples `name` whose labels include `labels`."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def has(self, name: str) -> bool:
        return any(sample.name == name for sample in self.samples)


def scrape(serve_app) -> Scrape:
    response = httpx.get(serve_app.metrics_url, timeout=10)
    response.raise_for_status()
    return Scrape(response.text)


def test_traffic_shows_on_rays_metrics_endpoint(serve_app):
    time.sleep(EXPORT_INTERVAL_S + 1.0)  # earlier tests' traffic reaches the endpoint first
    before = scrape(serve_app)
    # A clip of its own: no other test's voice is in the replica's cache, nor this one in theirs.
    reference = base64.b64encode(voice_wav(8.5)).decode()
    chunk_seconds = []
    for text in ["A voice, the first time.", "The same voice again."]:
        response = httpx.post(
            f"{serve_app.url}/v1/tts",
            json={"text": text, "reference_audio_base64": reference, "seed": 3},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        result = response.json()
        chunk_seconds += [chunk["num_samples"] / result["sample_rate"] for chunk in result["chunks"]]
    assert len(chunk_seconds) == 2  # one chunk each
    too_long = "a" * (serve_app.args.limits.max_text_chars + 1)
    response = httpx.post(f"{serve_app.url}/v1/tts", json={"text": too_long}, timeout=30)
    assert (response.status_code, response.json()["error"]["code"]) == (413, "text_too_long")
    with pytest.raises(SynthesisError) as refused:
        serve_app.ingress.synthesize.remote(SynthesisRequest(text=too_long)).result()
    assert refused.value.code == "text_too_long"

    def delta(after: Scrape, name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    # What the traffic adds to each series (at least); Ray exports each process on its own clock.
    expected = [
        (REFUSALS, {"code": "text_too_long"}, 2),
        (VOICE_CACHE_LOOKUPS, {"result": "hit"}, 1),
        (VOICE_CACHE_LOOKUPS, {"result": "miss"}, 1),
        (PREFIX_CACHE_LOOKUPS, {"result": "hit"}, 1),
        (PREFIX_CACHE_LOOKUPS, {"result": "miss"}, 1),
        (DECODE_STEPS, {}, 2),
        (f"{TIME_TO_FIRST_AUDIO}_count", {}, 2),
        (f"{CHUNK_RTF}_count", {}, 2),
        (f"{CHUNK_QUEUE}_count", {}, 2),
    ]
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    after = scrape(serve_app)
    while not all(delta(after, name, **labels) >= least for name, labels, least in expected):
        assert time.monotonic() < deadline, {
            f"{name} {labels}": delta(after, name, **labels) for name, labels, _ in expected
        }
        time.sleep(1.0)
        after = scrape(serve_app)

    # The model's audio of both chunks, as the answers report it.
    assert delta(after, AUDIO_SECONDS) == pytest.approx(sum(chunk_seconds), rel=1e-6)
    # One refusal over HTTP and one over the handle API, each counted once, with its status.
    assert delta(after, REFUSALS, code="text_too_long", status="413") == 2
    # The first request prepared the voice, the second found it (one replica in this app).
    assert delta(after, VOICE_CACHE_LOOKUPS, result="miss") == 1
    assert delta(after, VOICE_CACHE_LOOKUPS, result="hit") == 1
    # The engine computed the voice's prompt K/V for the first chunk and copied it for the second.
    assert delta(after, PREFIX_CACHE_LOOKUPS, result="miss") == 1
    assert delta(after, PREFIX_CACHE_LOOKUPS, result="hit") == 1
    # Both good requests had a first chunk; neither refusal reached the model. (Ray estimates a
    # histogram's _sum from bucket midpoints, so the buckets are what to check.)
    assert delta(after, f"{TIME_TO_FIRST_AUDIO}_count") == 2
    assert delta(after, f"{TIME_TO_FIRST_AUDIO}_bucket", le="+Inf") == 2
    assert delta(after, f"{TIME_TO_FIRST_AUDIO}_bucket", le="0.01") == 0  # a chunk takes longer
    assert delta(after, f"{CHUNK_RTF}_count") == 2
    assert delta(after, f"{CHUNK_QUEUE}_count") == 2
    # Two chunks of at most CHUNK_MAX_NEW_TOKENS tokens: one decode step per token after the first.
    assert 2 <= delta(after, DECODE_STEPS) <= 2 * CHUNK_MAX_NEW_TOKENS
    # Nothing decoding or waiting now.
    assert after.has(LIVE_ROWS) and after.total(LIVE_ROWS) == 0
    assert after.has(QUEUE_DEPTH) and after.total(QUEUE_DEPTH) == 0
    # Serve tags every series with its deployment.
    refusal_tags = [s.labels for s in after.samples if s.name == REFUSALS]
    assert all(tags.get("deployment") == "Ingress" for tags in refusal_tags), refusal_tags


def test_a_streamed_chunk_counts_in_audio_seconds_and_the_real_time_factor(serve_app):
    time.sleep(EXPORT_INTERVAL_S + 1.0)  # earlier tests' traffic reaches the endpoint first
    before = scrape(serve_app)
    body = {"model": "chatterbox-turbo", "input": "One streamed line.", "response_format": "pcm", "seed": 4}
    response = httpx.post(f"{serve_app.url}/v1/audio/speech", json=body, timeout=120)
    assert response.status_code == 200, response.text
    streamed_s = len(response.content) / 2 / S3GEN_SR  # s16le mono; one chunk, token by token

    def delta(after: Scrape, name: str) -> float:
        return after.total(name) - before.total(name)

    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    after = scrape(serve_app)
    while delta(after, f"{CHUNK_RTF}_count") < 1:
        assert time.monotonic() < deadline, "the streamed chunk never reached the metrics"
        time.sleep(1.0)
        after = scrape(serve_app)
    assert delta(after, f"{CHUNK_RTF}_count") == 1
    assert delta(after, f"{CHUNK_QUEUE}_count") == 1
    # The chunk's audio as the model made it; the stream's last piece may differ by < 10 ms, what
    # watermarking a piece that is not a whole number of the watermark's hops does to its length.
    assert delta(after, AUDIO_SECONDS) == pytest.approx(streamed_s, abs=0.01)
