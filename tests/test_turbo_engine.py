"""TurboEngine on the tiny checkpoint: exactness under continuous batching, the slot cache's capacity,
cancellation, the voice-prefix cache, failure isolation, T3/S3Gen overlap and token streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox.constants import STOP_SPEECH_TOKEN
from chatterbox.engine import EngineCapacityError, EngineClosedError, EngineConfig, TurboEngine
from chatterbox.engine.batch import Row
from chatterbox.engine.capacity import free_memory
from chatterbox.engine.kv_cache import SlotCache
from chatterbox.errors import EmptyTextError, TextTooLongError
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from chatterbox.voice import Voice
from tests.audio_samples import encode, speechlike
from tests.model_probes import teacher_forced_logits

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
        assert engine.stats().steps_per_s > 0
        joiner_audio = await engine.submit(joiner, "joiner", ignore_stop_token=True)
        return await first_audio, joiner_audio

    # Split prefills: the joiner's prefill shares iterations with the first request's decode steps.
    with running(tts, max_slots=4, prefill_chunk_tokens=64) as engine:
        first_wav, joiner_wav = asyncio.run(run(engine))
        first_times, joiner_times = engine.stage_times("first"), engine.stage_times("joiner")
    assert first_times.first_token < joiner_times.admitted < first_times.t3_done  # joined mid-decode
    assert_solo_audio(tts, first, first_wav, ignore_stop_token=True)
    assert_solo_audio(tts, joiner, joiner_wav, ignore_stop_token=True)


def test_a_burst_beyond_capacity_queues_and_every_request_is_exact(stopping_tts: TurboTTS, voices):
    settings = [
        SamplingParams(seed=10 + i, max_new_tokens=15 + 5 * i, temperature=0.5 + 0.1 * i, top_k=20 + 200 * i)
        for i in range(5)
    ]
    texts = ["Hi.", "A longer sentence, with a comma.", "Numbers 1, 2, 3.", "Short.", "One more [sigh] line."]
    requests = [
        TTSRequest(texts[i % len(texts)], voice=voices[i % 3], sampling=params)
        for i, params in enumerate(settings)
    ]

    async def run(engine: TurboEngine) -> tuple[list[np.ndarray], int]:
        submitted = [asyncio.ensure_future(engine.submit(r)) for r in requests]
        await wait_until(lambda: engine.stats().queue_depth > 0 or all(s.done() for s in submitted))
        queued = engine.stats().queue_depth
        return list(await asyncio.gather(*submitted)), queued

    with running(stopping_tts, max_slots=2, s3gen_max_batch=4) as engine:
        wavs, queued = asyncio.run(run(engine))
        stats = engine.stats()
    assert queued > 0  # the burst had to wait for rows
    assert stats.peak_live_rows == 2  # full, never over
    assert (stats.requests_done, stats.live_rows, stats.queue_depth) == (5, 0, 0)
    assert len({len(wav) for wav in wavs}) >= 3  # rows stopped at different steps: rows were repacked
    for request, wav in zip(requests, wavs, strict=True):
        assert_solo_audio(stopping_tts, request, wav)


def test_cancel_frees_the_row_at_the_next_iteration(tts: TurboTTS):
    long = TTSRequest("A long request.", sampling=SamplingParams(seed=3, max_new_tokens=500))
    waiting = TTSRequest("I wait.", sampling=SamplingParams(seed=4, max_new_tokens=20))
    after = TTSRequest("I come after.", sampling=SamplingParams(seed=5, max_new_tokens=20))

    async def run(engine: TurboEngine) -> np.ndarray:
        long_audio = asyncio.ensure_future(engine.submit(long, "long", ignore_stop_token=True))
        await wait_until(lambda: engine.stats().steps >= 3)
        waiting_audio = asyncio.ensure_future(engine.submit(waiting, "waiting"))
        await wait_until(lambda: engine.stats().queue_depth == 1)
        engine.cancel("waiting")
        with pytest.raises(asyncio.CancelledError):
            await waiting_audio
        assert engine.stats().queue_depth == 0
        engine.cancel("long")
        with pytest.raises(asyncio.CancelledError):
            await long_audio
        stats = engine.stats()
        assert (stats.live_rows, stats.requests_cancelled) == (0, 2)
        assert stats.steps < 100  # the long request left long before its 500 tokens
        return await engine.submit(after, "after")  # the one row is free again

    with running(tts, max_slots=1) as engine:
        wav = asyncio.run(run(engine))
        assert engine.stats().requests_done == 1
    assert_solo_audio(tts, after, wav)


def _prefill_logits(engine: TurboEngine, request: TTSRequest) -> torch.Tensor:
    """Logits after START from the engine's own admission path, driven here in place of its loop."""
    job = engine.tts.jobs([request])[0]
    batch = engine._batch
    row = Row(job.t3_request(), "probe", job.voice.id)  # unchecked: only its prefill runs
    with torch.inference_mode():
        batch._begin_prefill(row, cache_row=0)
        logits = None
        while logits is None:
            _, logits = batch._prefill_chunk(row, math.inf)
    return logits[0]


def test_prefix_cached_prefill_equals_uncached_and_the_cache_is_lru(tts: TurboTTS, voices: list[Voice]):
    a, b, c = voices
    engine = TurboEngine(tts, EngineConfig(max_slots=1, max_positions=POSITIONS, prefix_cache_voices=2))
    uncached = TurboEngine(tts, EngineConfig(max_slots=1, max_positions=POSITIONS, prefix_cache_voices=0))
    request = TTSRequest("Same voice, other text.", voice=b)
    _prefill_logits(engine, TTSRequest("This prefill stores the voice prefix.", voice=b))
    cached = _prefill_logits(engine, request)
    assert (engine.stats().prefix_hits, engine.stats().prefix_misses) == (1, 1)
    computed = _prefill_logits(uncached, request)
    assert uncached.stats().prefix_hits == 0
    torch.testing.assert_close(cached, computed, atol=1e-5, rtol=0)
    # ... and both equal a one-forward prefill of the whole row
    whole_row = teacher_forced_logits(
        tts.t3, [tts.jobs([request])[0].t3_request()], [torch.zeros(0, dtype=torch.long)]
    )[0][0]
    torch.testing.assert_close(cached, whole_row, atol=1e-5, rtol=0)

    # LRU: a hit makes a voice the most recent, so C evicts B (first-in-first-out would evict A).
    for voice in (a, b, c):
        _prefill_logits(engine, TTSRequest("Hello.", voice=voice))
    assert engine.prefix_cache.voice_ids() == [b.id, c.id]  # a used, b hit, c stored and a evicted
    _prefill_logits(engine, TTSRequest("Hello.", voice=a))
    assert engine.prefix_cache.voice_ids() == [c.id, a.id]
    assert (engine.stats().prefix_hits, engine.stats().prefix_misses) == (2, 4)


def test_a_bad_request_never_affects_the_others(tts: TurboTTS, voices: list[Voice]):
    good = [
        TTSRequest("A good request.", voice=voices[1], sampling=SamplingParams(seed=7, max_new_tokens=15)),
        TTSRequest("Another good one.", voice=voices[2], sampling=SamplingParams(seed=8, max_new_tokens=15)),
    ]
    conditionals = voices[1].conditionals
    # T3 accepts this voice; S3Gen refuses it, inside a batch shared with the good rows.
    no_s3gen_prompt = Voice(
        "no-s3gen-prompt", dataclasses.replace(conditionals, prompt_tokens=conditionals.prompt_tokens[:0])
    )
    wrong_speaker = Voice("wrong-speaker", dataclasses.replace(conditionals, speaker_emb=torch.zeros(3)))
    bad = [
        (
            TTSRequest("Vocoder fails.", voice=no_s3gen_prompt, sampling=good[0].sampling),
            "prompt_tokens is empty",
        ),
        (TTSRequest("", sampling=good[0].sampling), "text is empty"),
        (TTSRequest("Bad voice.", voice=wrong_speaker), "speaker_emb must have shape"),
        (
            TTSRequest("Too long for these rows.", sampling=SamplingParams(max_new_tokens=1000)),
            "rows hold 700",
        ),
    ]

    async def run(engine: TurboEngine) -> list[np.ndarray | BaseException]:
        requests = [good[0], bad[0][0], good[1], *(request for request, _ in bad[1:])]
        calls = [engine.submit(request, ignore_stop_token=True) for request in requests]
        return await asyncio.gather(*calls, return_exceptions=True)

    with running(tts, max_slots=4) as engine:
        first, vocoder_error, second, *input_errors = asyncio.run(run(engine))
        assert engine.stats().requests_failed == 1  # the three others never entered
    for (_, message), error in zip(bad, [vocoder_error, *input_errors], strict=True):
        assert isinstance(error, Exception) and re.search(message, str(error)), error
    assert isinstance(input_errors[0], EmptyTextError) and isinstance(input_errors[2], TextTooLongError)
    assert_solo_audio(tts, good[0], first, ignore_stop_token=True)
    assert_solo_audio(tts, good[1], second, ignore_stop_token=True)


def test_s3gen_vocodes_while_t3_decodes(tts: TurboTTS):
    short = TTSRequest("Short.", sampling=SamplingParams(seed=1, max_new_tokens=20))
    long = TTSRequest("A long one.", sampling=SamplingParams(seed=2, max_new_tokens=120))

    async def run(engine: TurboEngine) -> list[float]:
        arrivals: list[float] = []  # when each of the long row's tokens reached this loop

        async def follow_long() -> None:
            async for chunk in engine.stream(long, "long", ignore_stop_token=True):
                arrivals.extend([time.monotonic()] * chunk.numel())

        await asyncio.gather(engine.submit(short, "short", ignore_stop_token=True), follow_long())
        return arrivals

    with running(tts, max_slots=2) as engine:
        arrivals = asyncio.run(run(engine))
        short_times, long_times = engine.stage_times("short"), engine.stage_times("long")
    assert long_times.first_token < short_times.s3gen_start < short_times.s3gen_done < long_times.t3_done
    # The long row kept decoding while the short row was vocoded: T3 never waited for S3Gen.
    during = [t for t in arrivals if short_times.s3gen_start < t < short_times.s3gen_done]
    assert len(during) >= 3, (len(during), short_times)


def test_stream_yields_exactly_the_submit_tokens(tts: TurboTTS, voices: list[Voice]):
    request = TTSRequest("Stream me.", voice=voices[2], sampling=SamplingParams(seed=9, max_new_tokens=25))
    neighbour = TTSRequest("Share the steps.", sampling=SamplingParams(seed=10, max_new_tokens=20))

    async def run(engine: TurboEngine) -> tuple[list[torch.Tensor], np.ndarray]:
        neighbour_audio = asyncio.ensure_future(engine.submit(neighbour))
        chunks = [chunk async for chunk in engine.stream(request)]
        await neighbour_audio
        return chunks, await engine.submit(request)

    with running(tts, max_slots=2) as engine:
        chunks, wav = asyncio.run(run(engine))
    expected = tts.speech_tokens([request])[0]
    assert len(chunks) >= 2  # tokens arrived while T3 was still sampling
    assert all(chunk.dtype == torch.long and chunk.device.type == "cpu" for chunk in chunks)
    assert torch.equal(torch.cat(chunks), expected)
    assert len(wav) == 960 * (expected.numel() + 3)  # submit vocoded the same tokens


def test_a_cache_that_cannot_fit_fails_at_construction_naming_one_that_would(tts: TurboTTS):
    per_position = SlotCache.nbytes_for(tts.t3.config.gpt2, 1, 1, torch.float32)  # one row, one position
    too_many = 4 * free_memory(torch.device("cpu")) // (per_position * 2402) + 4  # 4x what is free
    with pytest.raises(EngineCapacityError) as info:
        TurboEngine(tts, EngineConfig(max_slots=too_many))
    message = str(info.value)
    assert f"max_slots={too_many} x max_positions=2402 (torch.float32)" in message
    fitting = re.search(
        r"([\d.]+) GiB is free; max_slots=(\d+) \(at max_positions=2402\) or max_positions=(\d+)", message
    )
    assert fitting, message
    free = (float(fitting[1]) + 0.01) * 2**30
    slots, positions = int(fitting[2]), int(fitting[3])
    assert 1 <= slots < too_many and slots * 2402 * per_position <= free
    assert 2 <= positions < 2402 and too_many * positions * per_position <= free


def test_close_fails_unfinished_requests_clearly(tts: TurboTTS):
    long = TTSRequest("Never finishes.", sampling=SamplingParams(seed=6, max_new_tokens=500))

    async def run(engine: TurboEngine) -> None:
        live = asyncio.ensure_future(engine.submit(long, "live", ignore_stop_token=True))
        waiting = asyncio.ensure_future(engine.submit(long, "waiting", ignore_stop_token=True))
        await wait_until(lambda: engine.stats().steps >= 2)
        engine.close()
        for call, request_id in ((live, "live"), (waiting, "waiting")):
            with pytest.raises(EngineClosedError, match=f"closed before request {request_id} finished"):
                await call
        with pytest.raises(EngineClosedError, match="closed"):
            await engine.submit(long)

    with running(tts, max_slots=1) as engine:
        asyncio.run(run(engine))


def test_cached_tensors_hold_no_autograd_graph_after_real_requests(tts: TurboTTS, voices: list[Voice]):
    requests = [
        TTSRequest("Cache me.", voice=voice, sampling=SamplingParams(seed=i, max_new_tokens=10))
        for i, voice in enumerate(voices)
    ]

    async def run(engine: TurboEngine) -> None:
        await asyncio.gather(*(engine.submit(request) for request in requests))

    with running(tts, max_slots=2) as engine:
        asyncio.run(run(engine))
        prefixes = [engine.prefix_cache.get(voice.id) for voice in voices]
        caches = [engine._batch.cache.k, engine._batch.cache.v]
    assert all(prefix is not None for prefix in prefixes)
    voice_tensors = [tensor for voice in voices for tensor in vars(voice.conditionals).values()]
    cached = [*caches, *(tensor for prefix in prefixes for tensor in prefix), *voice_tensors]
    assert len(cached) == 2 + 2 * len(voices) + 5 * len(voices)
    for tensor in cached:
        assert not tensor.requires_grad and tensor.grad_fn is None
