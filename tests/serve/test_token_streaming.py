"""Token-level streaming through the service: a one-chunk text arrives in several pieces (chunk-level
streaming sent one), and the pieces of every streamed format concatenate to a decodable file."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
from ray import serve

from serve_app.api.openai import SERVED_MODEL_ID
from serve_app.schemas import AudioPiece, SynthesisRequest
from tests.serve.conftest import APP_NAME
from tests.serve.test_serve_app import SR

TEXT = "One sentence, one chunk."  # 51 tokens at most: hops of 16 and 32 tokens, then the rest


def whole_length(serve_app, seed: int) -> int:
    response = httpx.post(f"{serve_app.url}/v1/tts", json={"text": TEXT, "seed": seed}, timeout=120)
    assert response.status_code == 200 and len(response.json()["chunks"]) == 1
    return len(sf.read(io.BytesIO(base64.b64decode(response.json()["audio_base64"])), dtype="int16")[0])


def test_the_first_chunk_streams_token_by_token(serve_app):
    handle = serve.get_app_handle(APP_NAME).options(stream=True)
    pieces = list(handle.synthesize_stream.remote(SynthesisRequest(text=TEXT, seed=3)))
    assert all(isinstance(p, AudioPiece) for p in pieces)
    assert len(pieces) >= 2  # chunk-level streaming sends a one-chunk text as one piece
    assert [p.chunks_done for p in pieces] == [0] * (len(pieces) - 1) + [1]
    assert [p.start_sample for p in pieces] == list(np.cumsum([0] + [p.num_samples for p in pieces[:-1]]))
    assert sum(p.num_samples for p in pieces) == whole_length(serve_app, seed=3)


@pytest.mark.parametrize(
    ("response_format", "stream_format"), [("pcm", "audio"), ("wav", "audio"), ("pcm", "sse"), ("wav", "sse")]
)
def test_streamed_pieces_concatenate_to_a_decodable_file(serve_app, response_format, stream_format):
    body = {
        "model": SERVED_MODEL_ID,
        "input": TEXT,
        "response_format": response_format,
        "stream_format": stream_format,
        "seed": 4,
    }
    with httpx.stream("POST", f"{serve_app.url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200
        if stream_format == "sse":
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1]["type"] == "speech.audio.done"
            parts = [base64.b64decode(e["audio"]) for e in events[:-1]]
        else:
            parts = list(response.iter_bytes())
    data = b"".join(parts)
    if response_format == "pcm":
        samples = np.frombuffer(data, "<i2")
    else:
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="int16")
        assert sample_rate == SR
    assert len(samples) == whole_length(serve_app, seed=4)
    assert np.abs(samples).max() > 0
