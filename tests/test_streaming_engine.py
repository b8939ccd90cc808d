"""Token-level audio streaming over a TurboEngine (tiny checkpoint): first audio while T3 decodes,
exact audio per request whatever shares its steps, cancellation, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.errors import EmptyTextError
from chatterbox.s3gen import S3GenRequest
from chatterbox.s3gen.streaming import HopSchedule, StreamingS3Gen
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS, derive_seed
from tests.audio_samples import encode, speechlike

SCHEDULE = HopSchedule()


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


@contextlib.contextmanager
def streaming(tts: TurboTTS, **config: int) -> Iterator[tuple[TurboEngine, TurboEngine]]:
    engine = TurboEngine(tts, EngineConfig(max_positions=900, hop_schedule=SCHEDULE, **config))
    engine.start()
    try:
        yield engine, engine
    finally:
        engine.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def offline_stream(tts: TurboTTS, request: TTSRequest) -> np.ndarray:
    """The request's solo T3 tokens streamed through StreamingS3Gen alone, with the engine's seeds."""
    tokens = tts.speech_tokens([request])[0]
    conditionals = (request.voice or tts.default_voice).conditionals
    s3gen_request = S3GenRequest(
        speech_tokens=tokens,
        prompt_tokens=conditionals.prompt_tokens,
        prompt_feat=conditionals.prompt_feat,
        embedding=conditionals.embedding,
        seed=derive_seed(request.sampling.seed, "s3gen"),
    )
    pieces = StreamingS3Gen(tts.s3gen, SCHEDULE).stream_tokens([s3gen_request])[0]
    return torch.cat(pieces).numpy()


def test_first_audio_leaves_while_t3_still_decodes(tts: TurboTTS):
    request = TTSRequest("A long sentence to stream.", sampling=SamplingParams(seed=3, max_new_tokens=150))

    async def run(engine: TurboEngine, streamer: TurboEngine) -> tuple[list[np.ndarray], float]:
        pieces, first_at = [], 0.0
        async with contextlib.aclosing(streamer.stream_audio(request, "long")) as audio:
            async for piece in audio:
                first_at = first_at or time.monotonic()
                pieces.append(piece)
        return pieces, first_at

    with streaming(tts) as (engine, streamer):
        pieces, first_at = asyncio.run(run(engine, streamer))
        times = engine.stage_times("long")
        stats = streamer.vocoder_stats()
    assert times.first_token < first_at < times.t3_done  # audio left while T3 was still decoding
    # The first piece is the first hop: 16 tokens, less the 8 frames held back for the seam.
    assert len(pieces[0]) == 480 * (2 * SCHEDULE.first_hop - SCHEDULE.overlap_frames)
    wav = np.concatenate(pieces)
    n_tokens = tts.speech_tokens([request])[0].numel()
    assert len(wav) == 960 * (n_tokens + 3)
    assert np.abs(wav - offline_stream(tts, request)).max() < 1e-5
    assert (stats.streams_done, stats.live_streams, stats.hops) == (1, 0, len(pieces))


def test_concurrent_streams_each_get_their_solo_audio(tts: TurboTTS):
    voice = tts.prepare_voice(encode(speechlike(7.0, 16000, seed=7), 16000))
    requests = [
        TTSRequest("First of three.", sampling=SamplingParams(seed=1, max_new_tokens=60)),
        TTSRequest("Second, another voice.", voice=voice, sampling=SamplingParams(seed=2, max_new_tokens=90)),
        TTSRequest("Third.", sampling=SamplingParams(seed=3, max_new_tokens=30, temperature=0.5)),
    ]

    async def collect(streamer: TurboEngine, request: TTSRequest) -> np.ndarray:
        return np.concatenate([piece async for piece in streamer.stream_audio(request)])

    async def run(streamer: TurboEngine) -> list[np.ndarray]:
        return list(await asyncio.gather(*(collect(streamer, r) for r in requests)))

    with streaming(tts, s3gen_max_batch=8) as (_, streamer):  # batched hops (the CPU default is 1)
        wavs = asyncio.run(run(streamer))
        stats = streamer.vocoder_stats()
    assert stats.hops > stats.steps  # some steps played several streams' hops together
    for request, wav in zip(requests, wavs, strict=True):
        assert np.abs(wav - offline_stream(tts, request)).max() < 1e-5


def test_cancelling_mid_stream_frees_the_row_and_stops_the_vocoder(tts: TurboTTS):
    request = TTSRequest("Cancelled early.", sampling=SamplingParams(seed=4, max_new_tokens=600))

    async def run(engine: TurboEngine, streamer: TurboEngine) -> int:
        async with contextlib.aclosing(streamer.stream_audio(request, "gone")) as audio:
            async for _ in audio:
                break  # the listener leaves after the first piece
        await wait_until(lambda: engine.stats().live_rows == 0 and streamer.vocoder_stats().live_streams == 0)
        hops = streamer.vocoder_stats().hops
        await asyncio.sleep(0.5)
        return hops

    with streaming(tts) as (engine, streamer):
        hops = asyncio.run(run(engine, streamer))
        stats, engine_stats = streamer.vocoder_stats(), engine.stats()
        times = engine.stage_times("gone")
    assert engine_stats.requests_cancelled == 1 and times.t3_done is None  # T3 stopped mid-decode
    assert (stats.streams_cancelled, stats.streams_done, stats.hops) == (1, 0, hops)  # no hop after


def test_a_request_cancelled_in_the_engine_ends_its_stream_with_cancelled_error(tts: TurboTTS):
    request = TTSRequest("Cancelled by id.", sampling=SamplingParams(seed=5, max_new_tokens=600))

    async def listen(engine: TurboEngine, streamer: TurboEngine) -> None:
        async for _ in streamer.stream_audio(request, "by-id"):
            engine.cancel("by-id")  # after the first piece

    async def run(engine: TurboEngine, streamer: TurboEngine) -> None:
        listening = asyncio.ensure_future(listen(engine, streamer))
        await asyncio.wait([listening])
        with pytest.raises(asyncio.CancelledError):
            listening.result()
        await wait_until(lambda: streamer.vocoder_stats().live_streams == 0)

    with streaming(tts) as (engine, streamer):
        asyncio.run(run(engine, streamer))
        stats = streamer.vocoder_stats()
    assert engine.stats().requests_cancelled == 1
    assert (stats.streams_cancelled, stats.streams_done, stats.streams_failed) == (1, 0, 0)


def test_bad_input_raises_before_any_audio(tts: TurboTTS):
    async def run(streamer: TurboEngine) -> None:
        async for _ in streamer.stream_audio(TTSRequest("   ")):
            pytest.fail("no audio for empty text")

    with streaming(tts) as (engine, streamer), pytest.raises(EmptyTextError):
        asyncio.run(run(streamer))
    assert engine.stats().live_rows == 0
