"""The Serve graph end to end on a real local Ray: HTTP, handle API, batching, voices, errors."""

import asyncio
import base64
import io
import json
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
import soundfile as sf
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError

from chatterbox.errors import TTSInputError
from chatterbox.sampling import SamplingParams
from chatterbox.voice import decode_reference_audio
from serve_app.errors import SynthesisError, input_error, model_error, root_cause
from serve_app.schemas import ChunkJob, ReplicaStats, SharedReference, SynthesisRequest
from serve_app.synthesis.audio import StitchPlan, ms_to_samples
from serve_app.synthesis.chunking import split_text
from serve_app.synthesis.fanout import synthesize_chunks
from tests.serve.conftest import APP_NAME, CHUNK_MAX_NEW_TOKENS, voice_wav
from tests.text_samples import SENTENCES

SR = 24_000


def paragraph(n_chars: int, offset: int) -> str:
    out: list[str] = []
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(SENTENCES[(offset + len(out)) % len(SENTENCES)])
    return " ".join(out)


def post(serve_app, body, timeout: float = 120.0) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{serve_app.url}/v1/tts", json=body, timeout=timeout)
    return httpx.post(f"{serve_app.url}/v1/tts", content=body, timeout=timeout)


def test_long_text_is_one_wav_of_its_stitched_chunks(serve_app):
    text = paragraph(1200, 0) + "\n\n" + paragraph(760, 2)
    assert len(text) == 2015
    response = post(serve_app, {"text": text, "seed": 11})
    assert response.status_code == 200, response.text
    body = response.json()
    audio = base64.b64decode(body["audio_base64"])
    wav, sample_rate = sf.read(io.BytesIO(audio), dtype="int16")
    assert sf.info(io.BytesIO(audio)).subtype == "PCM_16"
    assert sample_rate == body["sample_rate"] == SR
    assert body["format"] == "wav"

    # The chunks are exactly what the ingress's chunker makes of the text.
    expected = split_text(text, serve_app.args.chunking.max_chunk_chars)
    assert [c["text"] for c in body["chunks"]] == [c.text for c in expected]
    assert len(expected) == 8
    assert [c.break_after for c in expected].count("paragraph") == 2

    # Length: the chunks, plus a pause after each (longer after a paragraph), minus a crossfade each.
    stitching = serve_app.args.stitching
    pause_ms = {"sentence": stitching.sentence_pause_ms, "paragraph": stitching.paragraph_pause_ms}
    pauses = [ms_to_samples(pause_ms[c.break_after], SR) for c in expected[:-1]]
    crossfade = ms_to_samples(stitching.crossfade_ms, SR)
    lengths = [c["num_samples"] for c in body["chunks"]]
    assert min(lengths) >= crossfade
    assert len(wav) == sum(lengths) + sum(pauses) - crossfade * (len(lengths) - 1)
    assert body["duration_s"] == pytest.approx(len(wav) / SR)
    starts = [c["start_sample"] for c in body["chunks"]]
    assert starts[0] == 0
    for i in range(1, len(starts)):
        assert starts[i] == starts[i - 1] + lengths[i - 1] + pauses[i - 1] - crossfade
    assert np.abs(wav).max() > 0


def test_concurrent_requests_are_batched(serve_app):
    before = serve_app.model.stats.remote().result()
    texts = [f"Request number {i} says hello." for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda t: post(serve_app, {"text": t, "format": "pcm"}), texts))
    assert [r.status_code for r in responses] == [200] * 8
    after = serve_app.model.stats.remote().result()
    assert after.chunks_finished - before.chunks_finished == 8  # one chunk each
    steps = after.engine.steps - before.engine.steps
    tokens = after.engine.tokens_generated - before.engine.tokens_generated
    assert tokens > steps  # so some decode steps sampled for more than one request


def test_clients_that_hang_up_mid_request_leave_the_replica_serving(serve_app):
    before = serve_app.model.stats.remote().result()

    def hang_up(i: int) -> type[Exception] | None:
        try:
            post(serve_app, {"text": f"Nobody waits for request {i}.", "format": "pcm"}, timeout=0.3)
        except httpx.TimeoutException as error:
            return type(error)
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(hang_up, range(4))) == [httpx.ReadTimeout] * 4
    response = post(serve_app, {"text": "Still serving.", "format": "pcm"})
    assert response.status_code == 200, response.text
    assert len(base64.b64decode(response.json()["audio_base64"])) > 0
    after = serve_app.model.stats.remote().result()
    assert after.chunks_received > before.chunks_received  # the same replica (a new one counts from 0)


def test_a_burst_beyond_the_queue_is_refused_at_once(serve_app):
    # 8 requests run in the ingress; the rest get our 503 at once (more get in when early ones
    # finish while the burst is still arriving on a slow machine, so the bounds leave room).
    def send(i: int) -> tuple[int, str, float]:
        text = f"Burst request {i}. It has a second sentence. And a third one, so it takes a while."
        response = post(serve_app, {"text": text, "format": "pcm"})
        return response.status_code, response.text, response.elapsed.total_seconds()

    with ThreadPoolExecutor(max_workers=40) as pool:
        outcomes = list(pool.map(send, range(40)))
    codes = Counter(code for code, _, _ in outcomes)
    assert set(codes) == {200, 503}, codes
    assert codes[503] >= 8, codes
    refused = [(text, seconds) for code, text, seconds in outcomes if code == 503]
    assert all('"overloaded"' in text and seconds < 5.0 for text, seconds in refused), refused


def test_handle_api_returns_the_http_audio(serve_app):
    request = {"text": "The same seed gives the same audio.", "seed": 5, "format": "flac", "temperature": 0.7}
    response = post(serve_app, request)
    assert response.status_code == 200, response.text
    result = serve_app.ingress.synthesize.remote(SynthesisRequest(**request)).result()
    assert result.audio == base64.b64decode(response.json()["audio_base64"])
    assert result.model_dump(exclude={"audio"}) == {
        k: v for k, v in response.json().items() if k != "audio_base64"
    }
    decoded, sample_rate = sf.read(io.BytesIO(result.audio))
    assert (sample_rate, len(decoded)) == (SR, result.chunks[0].num_samples)


def test_reference_voice_is_prepared_once_per_replica(serve_app):
    reference = base64.b64encode(voice_wav(6.0)).decode()
    before = serve_app.model.stats.remote().result()
    for text in ["A cloned voice, first time.", "The same voice again, with a second chunk. And a third."]:
        response = post(serve_app, {"text": text, "reference_audio_base64": reference, "format": "mp3"})
        assert response.status_code == 200, response.text
        audio, sample_rate = sf.read(io.BytesIO(base64.b64decode(response.json()["audio_base64"])))
        assert sample_rate == SR and len(audio) > 0
    after = serve_app.model.stats.remote().result()
    assert after.voices_prepared - before.voices_prepared == 1


def test_healthz_and_readyz(serve_app):
    response = httpx.get(f"{serve_app.url}/healthz", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    response = httpx.get(f"{serve_app.url}/readyz", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_readyz_answers_at_once_while_the_model_replica_is_saturated(serve_app):
    # More long chunk calls than the replica takes at once (2 x its batch of 8): a readiness call sent
    # to the replica would queue behind them; /readyz asks Serve's controller instead.
    sampling = SamplingParams(seed=1, max_new_tokens=400)
    calls = [
        serve_app.model.synthesize_chunk.remote(
            ChunkJob(request_id=f"busy-{i}", text=f"Busy line {i}.", voice=None, sampling=sampling)
        )
        for i in range(20)
    ]
    try:
        time.sleep(1.0)  # the calls reach the replica and its first batch starts
        begin = time.monotonic()
        response = httpx.get(f"{serve_app.url}/readyz", timeout=30)
        elapsed = time.monotonic() - begin
        assert (response.status_code, response.json()) == (200, {"status": "ready"})
        assert elapsed < 2.0, f"/readyz took {elapsed:.1f} s behind busy chunk calls"
    finally:
        for call in calls:
            call.cancel()


# 40 one-sentence paragraphs: 40 chunks, five full batches of the test replica.
LONG_TEXT = "\n\n".join(f"Line {i} of a long script." for i in range(40))


def wait_for_chunks_submitted(serve_app, more_than: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while serve_app.model.stats.remote().result().chunks_submitted <= more_than:
        assert time.monotonic() < deadline, "the replica ran nothing"
        time.sleep(0.05)


def stats_after_probes(serve_app) -> tuple[ReplicaStats, ReplicaStats]:
    """Replica stats after one one-chunk request, and after a second one. Anything still sent
    after the first probe would reach the replica before the second one finishes."""
    snapshots = []
    for i in range(2):
        response = post(serve_app, {"text": f"Probe {i}.", "format": "pcm"})
        assert response.status_code == 200, response.text
        snapshots.append(serve_app.model.stats.remote().result())
    return snapshots[0], snapshots[1]


def test_a_short_request_behind_a_long_one_finishes_first(serve_app):
    before = serve_app.model.stats.remote().result()
    long = serve_app.ingress.synthesize.remote(SynthesisRequest(text=LONG_TEXT, format="pcm"))
    wait_for_chunks_submitted(serve_app, before.chunks_submitted)  # the long request is decoding
    short = post(serve_app, {"text": "A short one.", "format": "pcm"})
    assert short.status_code == 200, short.text
    with pytest.raises(TimeoutError):  # the long request is still running
        long.result(timeout_s=0)

    # Cancelling it (as its caller going away does) cancels its chunk calls: it sends no more.
    long.cancel()
    with pytest.raises((RequestCancelledError, TaskCancelledError)):
        long.result()
    first, second = stats_after_probes(serve_app)
    assert second.chunks_received - first.chunks_received == 1
    long_chunks = second.chunks_received - before.chunks_received - 3  # the short request and the two probes
    assert long_chunks <= 3 * serve_app.args.max_batch_size < 40


def in_engine(stats: ReplicaStats) -> int:
    """Chunk calls handed to the replica's engine and not answered yet."""
    return stats.chunks_submitted - stats.chunks_finished - stats.chunks_cancelled


def test_a_client_that_disconnects_stops_its_chunk_calls(serve_app):
    cap = serve_app.args.chunks_in_flight(on_gpu=False)
    before = serve_app.model.stats.remote().result()
    body = json.dumps({"text": LONG_TEXT, "format": "pcm"}).encode()
    head = f"POST /v1/tts HTTP/1.1\r\nHost: {APP_NAME}\r\nContent-Type: application/json\r\n"
    host, port = serve_app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # Hang up while one of its chunk calls is held open in the replica's engine.
        deadline = time.monotonic() + 120
        while not in_engine(now := serve_app.model.stats.remote().result()) or now.chunks_submitted <= (
            before.chunks_submitted
        ):
            assert time.monotonic() < deadline, "no chunk of the request reached the engine"
            time.sleep(0.01)
    gone = serve_app.model.stats.remote().result()
    first, second = stats_after_probes(serve_app)
    assert second.chunks_received - first.chunks_received == 1

    def reached(since: ReplicaStats) -> int:
        """The long request's chunks that reached the replica since `since`."""
        probes = 2
        return second.chunks_received - since.chunks_received - probes

    assert reached(before) >= 1
    # Once its client went, only the chunks it had in flight (at most its cap of 40) reached it.
    assert reached(gone) <= cap
    # The chunk in flight was cancelled in the replica. Whether its engine row was still live by then
    # is a race (it may be vocoding already); that a cancelled call leaves the engine is
    # test_model_replica's test_a_cancelled_chunk_call_leaves_the_engine_at_its_next_step.
    assert second.chunks_cancelled > before.chunks_cancelled


def chunk_job(text: str, voice: SharedReference | None, request_id: str | None = None) -> ChunkJob:
    sampling = SamplingParams(seed=1, max_new_tokens=CHUNK_MAX_NEW_TOKENS)
    return ChunkJob(request_id=request_id or text, text=text, voice=voice, sampling=sampling)


def broken_voice() -> SharedReference:
    """Not a ReferenceAudio: preparing it raises AttributeError, an error of no expected type."""
    return SharedReference(
        reference_id=f"not-a-reference-{time.monotonic()}", audio=ray.put("not a reference")
    )


def test_a_job_that_breaks_voice_preparation_fails_alone(serve_app):
    good_reference = decode_reference_audio(voice_wav(7.0))
    good_voice = SharedReference(reference_id=good_reference.id, audio=ray.put(good_reference))
    jobs = [
        chunk_job("Built-in.", None),
        chunk_job("Broken voice.", broken_voice()),
        chunk_job("Cloned voice.", good_voice),
    ]
    before = serve_app.model.stats.remote().result()
    responses = [serve_app.model.synthesize_chunk.remote(j) for j in jobs]
    audio = [responses[0].result(), responses[2].result()]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 and len(a) > 0 for a in audio)
    with pytest.raises(AttributeError) as raised:
        responses[1].result()
    after = serve_app.model.stats.remote().result()
    assert after.chunks_received - before.chunks_received == 3
    assert after.chunks_finished - before.chunks_finished == 2
    assert after.voices_prepared - before.voices_prepared == 1
    error = model_error(raised.value)  # what the ingress answers the owner of the broken job
    assert (error.status, error.code) == (503, "synthesis_failed")


def test_a_failed_chunk_cancels_the_rest_of_its_request(serve_app):
    # The ingress's chunk fan-out, run here against the real model deployment: one bad chunk first,
    # then 19 good ones, on 2 engine slots so that the failure arrives while others still wait.
    cap = serve_app.args.max_batch_size
    jobs = [chunk_job("Broken voice.", broken_voice(), "one-request")]
    jobs += [chunk_job(f"Chunk {i}.", None, "one-request") for i in range(1, 20)]
    batching = serve_app.args.batching
    in_pairs = batching.model_copy(update={"max_batch_size": 2})
    serve_app.model.reconfigure.remote(in_pairs.model_dump()).result()
    try:
        before = serve_app.model.stats.remote().result()
        with pytest.raises(AttributeError):
            asyncio.run(synthesize_chunks(serve_app.model, jobs, cap, time.monotonic()))
        first, second = stats_after_probes(serve_app)
    finally:
        serve_app.model.reconfigure.remote(batching.model_dump()).result()
    # Calls still queued for the replica when cancelled never reach it.
    received = first.chunks_received - before.chunks_received - 1  # less the first probe
    assert 1 <= received <= cap  # the chunks after the first `cap` were never sent
    finished = first.chunks_finished - before.chunks_finished - 1
    cancelled = second.chunks_cancelled - before.chunks_cancelled
    assert finished + cancelled == received - 1  # every good chunk that arrived: finished first, or cancelled
    assert finished <= 4  # those in the engine's two slots, and two that took them before the cancel


def test_reconfigure_never_raises_the_batch_size_above_max_ongoing_requests(serve_app):
    limit = 2 * serve_app.args.max_batch_size  # the deployment's max_ongoing_requests
    batching = serve_app.args.batching
    try:
        for asked, applied in [(4 * limit, limit), (3, 3)]:
            user_config = batching.model_copy(update={"max_batch_size": asked}).model_dump()
            serve_app.model.reconfigure.remote(user_config).result()
            assert serve_app.model.stats.remote().result().max_batch_size == applied
    finally:
        serve_app.model.reconfigure.remote(batching.model_dump()).result()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = {
    "malformed_json": (b'{"text": "hi",', 400, "invalid_json", None),
    "not_an_object": (b'["hi"]', 422, "invalid_parameter", None),
    "missing_text": ({"format": "wav"}, 422, "missing_parameter", "text"),
    "text_not_a_string": ({"text": 5}, 422, "invalid_parameter", "text"),
    "empty_text": ({"text": " \n\n "}, 422, "empty_text", "text"),
    "text_too_long": ({"text": "a" * 5001}, 413, "text_too_long", "text"),
    "unknown_format": ({"text": "hi", "format": "aac"}, 422, "invalid_parameter", "format"),
    "bad_temperature": ({"text": "hi", "temperature": 0}, 422, "invalid_parameter", "temperature"),
    "bad_top_p": ({"text": "hi", "top_p": 1.5}, 422, "invalid_parameter", "top_p"),
    "negative_seed": ({"text": "hi", "seed": -1}, 422, "invalid_parameter", "seed"),
    "unknown_field": ({"text": "hi", "temprature": 0.5}, 422, "invalid_parameter", "temprature"),
    "bad_base64": (
        {"text": "hi", "reference_audio_base64": "not base64!"},
        400,
        "invalid_base64",
        "reference_audio_base64",
    ),
    "not_audio": (
        {"text": "hi", "reference_audio_base64": b64(b"this is not audio" * 100)},
        422,
        "invalid_audio",
        "reference_audio_base64",
    ),
    "voice_too_short": (
        {"text": "hi", "reference_audio_base64": b64(voice_wav(2.0))},
        422,
        "voice_too_short",
        "reference_audio_base64",
    ),
    "silent_voice": (
        {"text": "hi", "reference_audio_base64": b64(voice_wav(6.0, silent=True))},
        422,
        "silent_audio",
        "reference_audio_base64",
    ),
    "voice_too_long": (
        {"text": "hi", "reference_audio_base64": b64(voice_wav(12.0))},
        422,
        "audio_too_long",
        "reference_audio_base64",
    ),
    "reference_too_large": (
        {"text": "hi", "reference_audio_base64": b64(bytes(1024 * 1024 + 1))},
        413,
        "reference_too_large",
        "reference_audio_base64",
    ),
    "request_too_large": ({"text": "a" * (2 * 1024 * 1024)}, 413, "request_too_large", None),
}


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_their_4xx_code(serve_app, body, status, code, field):
    response = post(serve_app, body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/v1/tts", 405, "method_not_allowed"), ("POST", "/v2/speak", 404, "not_found")],
)
def test_unknown_routes_answer_in_the_error_shape(serve_app, method, path, status, code):
    response = httpx.request(method, f"{serve_app.url}{path}", timeout=10)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_handle_api_raises_synthesis_errors(serve_app):
    with pytest.raises(SynthesisError) as raised:
        serve_app.ingress.synthesize.remote(
            SynthesisRequest(text="hi", reference_audio=b"junk" * 100)
        ).result()
    assert (raised.value.status, raised.value.code, raised.value.field) == (
        422,
        "invalid_audio",
        "reference_audio",
    )
    with pytest.raises(SynthesisError) as raised:
        serve_app.ingress.synthesize.remote(SynthesisRequest(text="")).result()
    assert raised.value.code == "empty_text"
    # The handle API refuses unspeakable characters as HTTP does.
    with pytest.raises(SynthesisError) as raised:
        serve_app.ingress.synthesize.remote(SynthesisRequest(text="Hi \x00 there.")).result()
    assert (raised.value.status, raised.value.code, raised.value.field) == (422, "invalid_parameter", "text")


def test_a_chunk_the_engine_refuses_reaches_the_ingress_as_its_input_error(serve_app):
    # The ingress chunks text to the model's token limit, so no request makes the engine refuse a
    # chunk; build the ingress's model -> stitcher hop by hand with a chunk over that limit.
    text = "Hi. " * serve_app.model.info.remote().result().max_text_tokens
    job = chunk_job(text, None, "engine-refusal")
    plan = StitchPlan(chunk_texts=[text], pauses=[], crossfade=0, sample_rate=SR, format="pcm")
    stitcher = serve.get_deployment_handle("Stitcher", APP_NAME)
    with pytest.raises(TTSInputError) as raised:  # what the ingress catches
        stitcher.stitch.remote(plan, serve_app.model.synthesize_chunk.remote(job)).result()
    error = input_error(root_cause(raised.value))
    assert (error.status, error.code, error.field) == (413, "text_too_long", "text")


def test_a_sampling_setting_set_past_validation_is_an_input_error(serve_app):
    # A ChunkJob's SamplingParams validates itself, so a bad setting never reaches the engine; a
    # handle caller can still assign one to its request after pydantic validated it.
    request = SynthesisRequest(text="Hi.")
    request.top_k = 0
    with pytest.raises(SynthesisError) as raised:
        serve_app.ingress.synthesize.remote(request).result()
    error = raised.value
    assert (error.status, error.code, error.field) == (422, "invalid_parameter", "top_k")
