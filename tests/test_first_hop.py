"""A short first streaming hop (down to 4 tokens) on the tiny checkpoint: when each hop plays, the
seam bounds of the default schedule (tests/test_s3gen_streaming.py), and through the engine."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench.streaming_quality import measure
from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.s3gen import S3Gen
from chatterbox.s3gen.streaming import HopSchedule, StreamingS3Gen
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from serve_app.config import AppArgs
from tests.test_s3gen_streaming import full_decode, hops_as_tokens_arrive, make_request

# A hop holds its overlap back for the next seam; 4 tokens are 8 frames, so 4 of them play.
FIRST_HOP_4 = HopSchedule(first_hop=4, overlap_frames=4)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> S3Gen:
    return S3Gen.from_file(tiny_checkpoint / "s3gen_meanflow.safetensors")


def test_a_first_hop_of_4_needs_an_overlap_it_can_play_past():
    with pytest.raises(ValueError, match=r"overlap_frames \(8\) must not exceed the first hop's 7 frames"):
        EngineConfig(hop_schedule=HopSchedule(first_hop=4))
    assert EngineConfig(hop_schedule=FIRST_HOP_4).hop_schedule.first_hop == 4
    served = AppArgs(engine={"hop_schedule": {"first_hop": 4, "overlap_frames": 4}})  # a config's args
    assert served.engine.hop_schedule == FIRST_HOP_4


@pytest.mark.parametrize("odd", [False, True])
def test_the_first_piece_leaves_after_7_tokens(model: S3Gen, odd: bool):
    request = make_request(31, 60, odd=odd)
    pieces = hops_as_tokens_arrive(StreamingS3Gen(model, FIRST_HOP_4), request)
    # Hops of 4, 8, 16, 32 tokens, each ready with its 3 lookahead tokens; the rest is the final hop.
    assert [n for n, _ in pieces] == [7, 15, 31, 60]
    assert [samples // 480 for _, samples in pieces] == [8 - odd - 4, 16, 32, 4 + 2 * (60 - 28 + 3)]
    assert sum(samples for _, samples in pieces) == full_decode(model, request).numel()


@pytest.mark.parametrize(
    "schedule", [FIRST_HOP_4, HopSchedule(first_hop=8)], ids=["first_hop=4", "first_hop=8"]
)
@pytest.mark.parametrize("odd", [False, True])
def test_short_first_hops_keep_the_default_seam_bounds(model: S3Gen, schedule: HopSchedule, odd: bool):
    """The bounds of test_streamed_audio_stays_close_to_the_full_decode (measured here: log-mel L1
    <= 0.032 overall, <= 0.057 at seams, seam jumps <= 1.044x the full decode's)."""
    requests = [make_request(40 + odd, 150, seed=seed, odd=odd) for seed in (21, 22)]
    streaming = StreamingS3Gen(model, schedule)
    for request, pieces in zip(requests, streaming.stream_tokens(requests), strict=True):
        reseeded = full_decode(model, dataclasses.replace(request, seed=request.seed + 1000))
        quality = measure(pieces, full_decode(model, request), reseeded, schedule.overlap_frames)
        assert quality.seams == (5 if schedule.first_hop == 4 else 4)
        assert quality.mel_l1 < 0.04
        assert quality.mel_l1 < quality.reseeded_mel_l1 / 5
        assert quality.seam_mel_l1 < 0.06
        assert quality.seam_jump < 1.05 * quality.full_jump_at_seams


def test_the_engine_streams_with_the_configured_first_hop(tiny_checkpoint: Path):
    tts = TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")
    request = TTSRequest("A sentence to stream early.", sampling=SamplingParams(seed=5, max_new_tokens=80))

    async def run() -> list[np.ndarray]:
        engine = TurboEngine(tts, EngineConfig(max_slots=2, hop_schedule=FIRST_HOP_4))
        engine.start()
        try:
            return [piece async for piece in engine.stream_audio(request)]
        finally:
            engine.close()

    pieces = asyncio.run(run())
    assert len(pieces[0]) == 480 * (2 * 4 - 4)  # 4 tokens, less the 4 frames held back
    tokens = tts.speech_tokens([request])[0]
    job = tts.jobs([request])[0]
    offline = StreamingS3Gen(tts.s3gen, FIRST_HOP_4).stream_tokens([job.s3gen_request(tokens)])[0]
    assert [len(p) for p in pieces] == [p.numel() for p in offline]
    assert np.abs(np.concatenate(pieces) - np.concatenate([p.numpy() for p in offline])).max() < 1e-5
