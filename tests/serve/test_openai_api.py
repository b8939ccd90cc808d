"""The OpenAI-compatible speech API: pure helpers, then the official `openai` client against the
session's local deployment (tiny checkpoint, watermark on)."""

import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
from ray import serve

from bench.streaming_quality import log_mel_l1
from serve_app.api.errors import openai_error
from serve_app.api.openai import (
    SERVED_MODEL_ID,
    SpeechRequest,
    decode_reference,
    sse_event,
    streaming_wav_header,
)
from serve_app.errors import SynthesisError
from serve_app.schemas import AudioPiece, SynthesisRequest
from serve_app.synthesis.audio import StreamingStitch, stitch
from serve_app.synthesis.chunking import split_text
from tests.serve.conftest import APP_NAME
from tests.serve.test_serve_app import SR, paragraph

FORMATS = ["wav", "flac", "mp3", "opus", "pcm"]


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("crossfade", [0, 7, 40])
def test_streaming_stitch_returns_exactly_the_stitched_samples(crossfade):
    rng = np.random.default_rng(crossfade)
    for _ in range(300):
        n = int(rng.integers(1, 6))
        # Chunks shorter than the crossfade and pauses shorter than it are the hard cases.
        chunks = [rng.standard_normal(int(rng.integers(1, 120))).astype(np.float32) for _ in range(n)]
        pauses = [int(rng.integers(0, 60)) for _ in range(n - 1)]
        joiner = StreamingStitch(pauses, crossfade)
        pieces = [joiner.add(chunk) for chunk in chunks]
        assert np.array_equal(np.concatenate(pieces), stitch(chunks, pauses, crossfade))


def test_streaming_stitch_holds_back_only_the_crossfade():
    joiner = StreamingStitch([100], crossfade=10)
    first = joiner.add(np.ones(50, np.float32))
    assert len(first) == 40  # the last 10 samples wait for the next chunk's fade-in
    assert len(joiner.add(np.ones(30, np.float32))) == 10 + 100 - 10 + 30
    with pytest.raises(ValueError, match="2 chunks expected"):
        joiner.add(np.ones(5, np.float32))


def test_streaming_wav_header_decodes_with_unknown_length():
    samples = (np.sin(np.arange(2400) / 5) * 8000).astype("<i2")
    wav, sample_rate = sf.read(io.BytesIO(streaming_wav_header(SR) + samples.tobytes()), dtype="int16")
    assert sample_rate == SR
    assert np.array_equal(wav, samples)


def test_sse_event_is_one_data_line():
    assert sse_event({"type": "speech.audio.done"}) == b'data: {"type":"speech.audio.done"}\n\n'


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("invalid_parameter", 400, "invalid_request_error"),  # ours is 422; OpenAI says 400
        ("voice_not_found", 404, "invalid_request_error"),
        ("text_too_long", 413, "invalid_request_error"),
        ("overloaded", 503, "overloaded_error"),
        ("internal_error", 500, "server_error"),
    ],
)
def test_openai_error_shape(code, status, kind):
    body, got_status = openai_error(SynthesisError(code, "m", "input"))
    assert got_status == status
    assert body.model_dump() == {"error": {"message": "m", "type": kind, "param": "input", "code": code}}


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"speed": 1.5}, "speed", "unsupported_value"),
        ({"instructions": "cheerful"}, "instructions", "unsupported_value"),
        ({"response_format": "aac"}, "response_format", "unsupported_value"),
        ({"stream_format": "sse", "response_format": "mp3"}, "stream_format", "unsupported_value"),
        ({"model": "whisper-1"}, "model", "model_not_found"),
        ({"reference_audio": "data:audio/wav,abc"}, "reference_audio", "invalid_base64"),
    ],
)
def test_speech_request_refuses_what_turbo_cannot_do(change, field, code):
    request = SpeechRequest(**{"model": SERVED_MODEL_ID, "input": "Hi.", **change})
    with pytest.raises(SynthesisError) as raised:
        request.synthesis_request()
    assert (raised.value.field, raised.value.code) == (field, code)


def test_speech_request_translates_to_ours():
    clip = b"RIFF-not-really-a-wav"
    data_url = "data:audio/wav;base64," + base64.b64encode(clip).decode()
    request = SpeechRequest(
        model="tts-1", input="Hi.", response_format="pcm", seed=3, reference_audio=data_url
    )
    expected = SynthesisRequest(text="Hi.", format="pcm", seed=3, reference_audio=clip)
    assert request.synthesis_request() == expected
    assert decode_reference(base64.b64encode(clip).decode()) == clip


# --- the official openai client against the deployment --------------------------------------------


@pytest.fixture(scope="module")
def client(serve_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def decode(audio: bytes, audio_format: str) -> tuple[np.ndarray, int]:
    if audio_format == "pcm":
        return np.frombuffer(audio, "<i2").astype(np.float32) / 32768, SR
    return sf.read(io.BytesIO(audio), dtype="float32")


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [SERVED_MODEL_ID]


@pytest.mark.parametrize("audio_format", FORMATS)
def test_every_format_decodes_at_24_khz(client, audio_format):
    response = client.audio.speech.create(
        model=SERVED_MODEL_ID, voice="default", input="A short test sentence.", response_format=audio_format
    )
    expected_type = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}
    assert response.response.headers["content-type"] == expected_type.get(audio_format, "audio/pcm")
    wav, sample_rate = decode(response.content, audio_format)
    assert sample_rate == SR
    assert 0.1 * SR < len(wav) < 10 * SR
    assert np.abs(wav).max() > 0.01


def test_streaming_response_reads_in_pieces(client):
    text = paragraph(600, 1)
    with client.audio.speech.with_streaming_response.create(
        model=SERVED_MODEL_ID, voice="default", input=text, response_format="wav", extra_body={"seed": 5}
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        parts = list(response.iter_bytes())
    wav, sample_rate = sf.read(io.BytesIO(b"".join(parts)), dtype="int16")
    assert sample_rate == SR
    assert len(wav) > SR


@pytest.mark.parametrize(
    ("change", "error_type", "param"),
    [
        ({"speed": 2.0}, openai.BadRequestError, "speed"),
        ({"instructions": "whisper it"}, openai.BadRequestError, "instructions"),
        ({"response_format": "aac"}, openai.BadRequestError, "response_format"),
        ({"extra_body": {"temperature": -1}}, openai.BadRequestError, "temperature"),
        ({"input": "\x00"}, openai.BadRequestError, "input"),
        ({"input": " "}, openai.BadRequestError, "input"),
        ({"voice": "alloy"}, openai.NotFoundError, "voice"),
    ],
)
def test_invalid_requests_raise_the_clients_errors(client, change, error_type, param):
    request = {"model": SERVED_MODEL_ID, "voice": "default", "input": "Hello.", "response_format": "pcm"}
    with pytest.raises(error_type) as raised:
        client.audio.speech.create(**{**request, **change})
    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"


def test_tts_keeps_its_own_error_shape(serve_app):
    response = httpx.post(f"{serve_app.url}/v1/tts", json={"text": "Hi.", "speed": 2}, timeout=30)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_sse_streams_deltas_then_done(serve_app):
    body = {"model": SERVED_MODEL_ID, "input": paragraph(500, 0), "response_format": "pcm"}
    body["stream_format"] = "sse"
    with httpx.stream("POST", f"{serve_app.url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) > 2
    done = events[-1]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["output_audio_seconds"] == pytest.approx(len(audio) / 2 / SR)
    assert 0 < done["timings"]["time_to_first_audio_s"] < done["timings"]["total_s"]


def test_handle_streams_typed_pieces(serve_app):
    handle = serve.get_app_handle(APP_NAME).options(stream=True)
    pieces = list(handle.synthesize_stream.remote(SynthesisRequest(text=paragraph(400, 3), seed=1)))
    assert all(isinstance(p, AudioPiece) for p in pieces)
    assert [p.start_sample for p in pieces] == list(np.cumsum([0] + [p.num_samples for p in pieces[:-1]]))
    assert all(len(p.audio) == 2 * p.num_samples for p in pieces)
    assert pieces[-1].chunks_done == pieces[-1].chunks_total > 1


def test_long_stream_starts_before_its_last_chunk_and_equals_the_whole_response(serve_app):
    text = paragraph(3000, 0)[:3000]
    num_chunks = len(split_text(text, serve_app.args.chunking.max_chunk_chars))
    submitted_before = serve_app.model.stats.remote().result().chunks_submitted
    body = {"model": SERVED_MODEL_ID, "input": text, "response_format": "pcm", "seed": 21}
    started_at = time.monotonic()
    with httpx.stream("POST", f"{serve_app.url}/v1/audio/speech", json=body, timeout=300) as response:
        assert response.status_code == 200
        parts = response.iter_bytes()
        first = next(parts)
        first_at = time.monotonic()
        # Chunks the model has started by now (handed to its engine).
        started_by_first_audio = serve_app.model.stats.remote().result().chunks_submitted - submitted_before
        streamed = first + b"".join(parts)
        finished_at = time.monotonic()
    # Measured (tiny, 2-core CPU): 11 chunks, first audio 0.87 s, whole 6.90 s.
    assert started_by_first_audio < num_chunks  # the last chunk was not even started
    assert first_at - started_at < 0.5 * (finished_at - started_at)

    def tts(text: str) -> np.ndarray:
        whole = httpx.post(f"{serve_app.url}/v1/tts", json={"text": text, "seed": 21}, timeout=300)
        return sf.read(io.BytesIO(base64.b64decode(whole.json()["audio_base64"])), dtype="int16")[0]

    expected = tts(text).astype(np.float64)
    got = np.frombuffer(streamed, "<i2").astype(np.float64)
    assert len(got) == len(expected)
    # The first chunk streams token by token (docs/streaming.md): the same tokens, decoded hop by hop
    # with noise drawn per position instead of in the whole decode's order, so it differs from the
    # whole decode as much as another S3Gen seed would. Measured log-mel L1: 0.27 (another seed's
    # whole decode of the tiny fixture: 0.26).
    first = len(tts(split_text(text, serve_app.args.chunking.max_chunk_chars)[0].text))
    streamed_first, whole_first = (torch.from_numpy(a[:first] / 32768).float() for a in (got, expected))
    assert log_mel_l1(streamed_first, whole_first).mean() < 0.4
    # The later chunks: same chunks, same joins; only the watermark differs: the stream marks each
    # piece on its own, the whole response marks the joined audio once. Measured: max |diff| 129
    # LSB, mean 0.85, against a signal of rms 485; without the watermark the pure-function test
    # above proves equality.
    diff = got[first:] - expected[first:]
    assert np.abs(diff).max() <= 0.01 * 32768
    assert np.sqrt(np.mean(diff**2)) < 0.02 * np.sqrt(np.mean(expected[first:] ** 2))


def test_openapi_documents_both_endpoints_with_examples(serve_app):
    spec = httpx.get(f"{serve_app.url}/openapi.json", timeout=30).json()
    for path, field in [("/v1/audio/speech", "input"), ("/v1/tts", "text")]:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in schema["required"]
        assert all(field in example for example in schema["examples"])
    assert "audio/pcm" in spec["paths"]["/v1/audio/speech"]["post"]["responses"]["200"]["content"]
    assert "/v1/models" in spec["paths"]
    docs = httpx.get(f"{serve_app.url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
