"""Nothing the engine keeps holds an autograd graph (tiny checkpoint): no parameter requires
grad, every model forward runs under torch.inference_mode(), and the prepared voices and the
prefix cache's K/V are graph-free inference tensors. A replica's voice cache and memory:
tests/serve/test_replica_memory.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from chatterbox.voice import Voice
from tests.audio_samples import encode, speechlike


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


def models(tts: TurboTTS) -> dict[str, nn.Module]:
    return {"t3": tts.t3, "s3gen": tts.s3gen, "conditioner": tts.conditioner}


def voice_tensors(voice: Voice) -> Iterator[torch.Tensor]:
    return (t for t in vars(voice.conditionals).values() if isinstance(t, torch.Tensor))


def assert_graph_free(tensor: torch.Tensor) -> None:
    assert not tensor.requires_grad
    assert tensor.grad_fn is None


def test_no_parameter_requires_grad(tts: TurboTTS):
    for name, module in models(tts).items():
        assert not any(p.requires_grad for p in module.parameters()), name


def test_every_forward_runs_in_inference_mode(tts: TurboTTS):
    """Each model's forwards, from the offline API and from both engine threads, record whether
    inference mode was on; the calls come from this (grad-enabled) test thread."""
    seen: dict[str, set[bool]] = {name: set() for name in models(tts)}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, _a, name=name: seen[name].add(torch.is_inference_mode_enabled())
        )
        for name, module in (
            ("t3", tts.t3.tfmr),
            ("s3gen", tts.s3gen.flow),
            ("s3gen", tts.s3gen.mel2wav),
            ("conditioner", tts.conditioner.voice_encoder),
        )
    ]
    request = TTSRequest("Hello there.", sampling=SamplingParams(seed=1, max_new_tokens=30))

    async def serve() -> None:
        engine = TurboEngine(tts, EngineConfig(max_slots=2, max_positions=600))
        engine.start()
        try:
            await engine.submit(request)
            [piece async for piece in engine.stream_audio(request)]
        finally:
            engine.close()

    try:
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        tts.prepare_voice(encode(speechlike(6.0, 16000, seed=3), 16000))
        tts.generate([request], watermark=False)
        asyncio.run(serve())
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"t3": {True}, "s3gen": {True}, "conditioner": {True}}


def test_prepared_voices_and_cached_prefixes_hold_no_graph(tts: TurboTTS):
    voices = [tts.prepare_voice(encode(speechlike(6.0, 16000, seed=s), 16000)) for s in (4, 5, 6)]
    for voice in voices:
        for tensor in voice_tensors(voice):
            assert_graph_free(tensor)
            assert tensor.is_inference()

    async def serve() -> TurboEngine:
        engine = TurboEngine(tts, EngineConfig(max_slots=2, max_positions=600, prefix_cache_voices=2))
        engine.start()
        try:
            for i, voice in enumerate(voices):
                await engine.submit(
                    TTSRequest("Cached.", voice=voice, sampling=SamplingParams(seed=i, max_new_tokens=5))
                )
        finally:
            engine.close()
        return engine

    engine = asyncio.run(serve())
    cache = engine.prefix_cache
    assert cache.voice_ids() == [voices[1].id, voices[2].id]  # full: the oldest voice left
    for voice_id in cache.voice_ids():
        entry = cache.get(voice_id)
        assert entry is not None
        for tensor in entry:
            assert_graph_free(tensor)
            assert tensor.is_inference()
