"""TurboEngine on the tiny checkpoint: exactness under continuous batching, the slot cache's capacity,
cancellation, the voice-prefix cache, failure isolation, T3/S3Gen overlap and token streaming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox.constants import STOP_SPEECH_TOKEN
from chatterbox.engine import TTSRequest, TurboTTS
from chatterbox.sampling import SamplingParams
from chatterbox.turbo_engine import (
    EngineConfig,
    TurboEngine,
)
from chatterbox.voice import Voice
from tests.audio_samples import encode, speechlike

POSITIONS = 700  # cache row length for the tests: enough for a 375-token prompt, text and 200 tokens


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def stopping_tts(tiny_checkpoint: Path) -> TurboTTS:
    """A tiny model that samples STOP now and then, so rows end at different steps."""
    model = TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")
    with torch.no_grad():
        model.t3.speech_head.bias[STOP_SPEECH_TOKEN] += 3.0
    return model


@pytest.fixture(scope="module")
def voices(tts: TurboTTS) -> list[Voice]:
    """Three voices with different prompt lengths (the built-in one and two prepared ones)."""
    refs = [encode(speechlike(s, sr, seed=int(s)), sr) for s, sr in ((6.0, 16000), (11.0, 44100))]
    return [tts.default_voice, *(tts.prepare_voice(ref) for ref in refs)]


@contextmanager
def running(tts: TurboTTS, **config: int | None) -> Iterator[TurboEngine]:
    engine = TurboEngine(tts, EngineConfig(**{"max_positions": POSITIONS, **config}))
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.002)


def assert_solo_audio(tts: TurboTTS, request: TTSRequest, wav: np.ndarray, ignore_stop_token: bool = False):
    """The engine's audio equals TurboTTS.generate of the request alone (so its tokens do too)."""
    alone = tts.generate([request], watermark=False, ignore_stop_token=ignore_stop_token)[0]
    assert wav.shape == alone.shape  # 960 samples per token: the same number of tokens
    assert np.abs(wav - alone).max() <= 1e-6


def test_a_request_joining_mid_decode_gets_its_solo_tokens_and_audio(tts: TurboTTS, voices: list[Voice]):
    first = TTSRequest(
        "The first request runs for a while.",
        voice=voices[1],
        sampling=SamplingParams(seed=1, max_new_tokens=50),
    )
    joiner = TTSRequest(
        "I join later [laugh] with other settings.",
        voice=voices[2],
        sampling=SamplingParams(seed=2, max_new_tokens=20, temperature=0.6, top_k=50, top_p=0.8),
    )

    async def run(engine: TurboEngine) -> tuple[np.ndarray, np.ndarray]:
        first_audio = asyncio.ensure_future(engine.submit(first, "first", ignore_stop_token=True))
        await wait_until(lambda: engine.stats().steps >= 5)
        joiner_audio = await engine.submit(joiner, "joiner", ignore_stop_token=True)
        return await first_audio, joiner_audio

    # Split prefills: the joiner's prefill shares iterations with the first request's decode steps.
    with running(tts, max_slots=4, prefill_chunk_tokens=64) as engine:
        first_wav, joiner_wav = asyncio.run(run(engine))
        first_times, joiner_times = engine.stage_times("first"), engine.stage_times("joiner")
    assert first_times.first_token < joiner_times.admitted < first_times.t3_done  # joined mid-decode
    assert_solo_audio(tts, first, first_wav, ignore_stop_token=True)
    assert_solo_audio(tts, joiner, joiner_wav, ignore_stop_token=True)
