"""bf16 end to end on the CPU (tiny checkpoint): voice preparation, T3 and the flow in bf16, HiFT in
fp32, whole and streamed through the engine; no dtype error, finite audio, and the GPU suite's
bf16-vs-fp32 bounds (bench/gpu_suite.py)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.gpu_suite import BF16_BOUNDS, Suite, bf16_errors
from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.s3gen.streaming import StreamingS3Gen
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from tests.audio_samples import encode, speechlike


@pytest.fixture(scope="module")
def bf16(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode(speechlike(7.0, 16000, seed=11), 16000)


def test_t3_and_the_flow_run_in_bf16_and_hift_in_fp32(bf16: TurboTTS):
    assert bf16.t3.speech_emb.weight.dtype == torch.bfloat16
    assert bf16.s3gen.flow.input_embedding.weight.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.s3gen.mel2wav.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.conditioner.parameters()} == {torch.float32}


def test_voice_preparation_is_the_fp32_one(bf16: TurboTTS, tiny_checkpoint: Path, clip: bytes):
    fp32 = TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")
    voice, reference = bf16.prepare_voice(clip), fp32.prepare_voice(clip)
    for name, tensor in vars(voice.conditionals).items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, getattr(reference.conditionals, name)), name
            assert tensor.dtype in (torch.float32, torch.int64), name


def test_generate_gives_finite_float32_audio(bf16: TurboTTS, clip: bytes):
    voice = bf16.prepare_voice(clip)
    requests = [
        TTSRequest("A cloned voice.", voice=voice, sampling=SamplingParams(seed=1, max_new_tokens=40)),
        TTSRequest("The built-in voice.", sampling=SamplingParams(seed=2, max_new_tokens=30)),
    ]
    tokens = bf16.speech_tokens(requests)
    for wav, n in zip(bf16.generate(requests, watermark=False), tokens, strict=True):
        assert wav.dtype == np.float32 and np.isfinite(wav).all() and np.abs(wav).max() > 0
        assert len(wav) == 960 * (n.numel() + 3)


def test_the_engine_in_bf16_whole_and_streamed(bf16: TurboTTS, clip: bytes):
    voice = bf16.prepare_voice(clip)
    request = TTSRequest("Streamed in bf16.", voice=voice, sampling=SamplingParams(seed=3, max_new_tokens=60))

    async def run() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        engine = TurboEngine(bf16, EngineConfig(max_slots=2, max_positions=600))
        engine.start()
        try:
            first = await engine.submit(request)  # its voice's prefix K/V computed, in bf16
            again = await engine.submit(request)  # ... and copied from the prefix cache
            pieces = [piece async for piece in engine.stream_audio(request)]
            assert (engine.stats().prefix_misses, engine.stats().prefix_hits) == (1, 2)
            assert engine.stats().cache_dtype == "bfloat16"
        finally:
            engine.close()
        return first, again, pieces

    first, again, pieces = asyncio.run(run())
    assert np.isfinite(first).all() and np.array_equal(first, again)  # a cached prefix is exact
    tokens = bf16.speech_tokens([request])[0]
    assert len(first) == 960 * (tokens.numel() + 3)
    streamed = np.concatenate(pieces)
    assert streamed.dtype == np.float32 and np.isfinite(streamed).all() and len(streamed) == len(first)
    job = bf16.jobs([request])[0]
    offline = StreamingS3Gen(bf16.s3gen).stream_tokens([job.s3gen_request(tokens)])[0]
    assert np.abs(streamed - torch.cat(offline).numpy()).max() < 1e-5


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")  # its fp16 HiFT probe
def test_bf16_stays_within_the_gpu_suites_bounds(tmp_path: Path):
    args = argparse.Namespace(device="cpu", size="tiny", seed=0, dtype="bf16")
    with torch.inference_mode():
        suite = Suite(args, tmp_path)
        suite.precision()
    errors = bf16_errors(suite.results)
    assert errors.keys() == BF16_BOUNDS.keys()
    for name, bound in BF16_BOUNDS.items():
        assert 0 < errors[name] <= bound, (name, errors[name])
