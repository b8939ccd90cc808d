"""On the CPU a seeded request's audio is the same samples whatever else the engine has in flight:
T3's seeded draws do not depend on a row's neighbours, and S3Gen vocodes each row alone there
(`EngineConfig.s3gen_max_batch` None). Durable jobs rely on it: a resumed job's chunks equal those
of an uninterrupted run under any load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS

TEXTS = (
    "The first chunk of a long narration, read in full.",
    "Short.",
    "A somewhat longer sentence with many words in it, so that the rows differ in length.",
    "Numbers 1, 2, 3 [laugh] and a tag.",
)


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


def requests() -> list[TTSRequest]:
    return [
        TTSRequest(text, sampling=SamplingParams(seed=20 + i, max_new_tokens=120))
        for i, text in enumerate(TEXTS)
    ]


def engine_audio(tts: TurboTTS, config: EngineConfig, batch: list[TTSRequest]) -> list[np.ndarray]:
    engine = TurboEngine(tts, config)
    engine.start()
    try:

        async def run() -> list[np.ndarray]:
            return list(await asyncio.gather(*(engine.submit(request) for request in batch)))

        return asyncio.run(run())
    finally:
        engine.close()


def test_a_rows_audio_is_the_same_samples_alone_and_beside_others(tts: TurboTTS):
    config = EngineConfig(max_slots=4, max_positions=700)
    together = engine_audio(tts, config, requests())
    for request, wav in zip(requests(), together, strict=True):
        (alone,) = engine_audio(tts, config, [request])
        assert np.array_equal(wav, alone)


def test_s3gen_batches_agree_only_to_rounding(tts: TurboTTS):
    """Why the CPU vocodes rows alone: the same rows in one S3Gen call differ in their last bits,
    enough to move a 16-bit sample by one step (the test above would fail with batches)."""
    jobs = tts.jobs(requests())
    tokens = tts.speech_tokens(requests())
    batched = tts.vocode_jobs(jobs, tokens)
    differences = []
    for job, row_tokens, wav in zip(jobs, tokens, batched, strict=True):
        (alone,) = tts.vocode_jobs([job], [row_tokens])
        assert np.array_equal(alone, tts.vocode_jobs([job], [row_tokens])[0])  # alone it repeats
        differences.append(float(np.abs(wav - alone).max()))
    assert max(differences) <= 1e-5
    assert max(differences) > 0
