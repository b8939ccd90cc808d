"""A replica's VoiceCache on the real tiny engine: one id per voice (the engine's), each voice
prepared once, the least recently used one evicted. Clips travel through the session's Ray."""

import asyncio
from pathlib import Path

import pytest
import ray

from chatterbox.hub import local_checkpoint
from chatterbox.tts import TurboTTS
from chatterbox.voice import ReferenceAudio, Voice, decode_reference_audio
from serve_app.schemas import SharedReference
from serve_app.voices.cache import VoiceCache
from tests.serve.conftest import voice_wav


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_checkpoint(local_checkpoint(tiny_checkpoint), device="cpu")


def cache_of(tts: TurboTTS, capacity: int) -> VoiceCache:
    async def prepare(clips: list[ReferenceAudio]) -> list[Voice | Exception]:
        return list(tts.prepare_voices(clips))

    return VoiceCache(capacity, voice_id=tts.voice_id, prepare=prepare)


def shared(reference: ReferenceAudio) -> SharedReference:
    """As the ingress sends it: a fresh object-store copy per request."""
    return SharedReference(reference_id=reference.id, audio=ray.put(reference))


def test_a_voice_is_prepared_once_under_the_id_the_engine_gives_it(serve_app, tts):
    reference = decode_reference_audio(voice_wav(6.0))
    cache = cache_of(tts, capacity=2)
    first = asyncio.run(cache.resolve([shared(reference), shared(reference)]))  # one batch, two chunks
    again = asyncio.run(cache.resolve([shared(reference)]))  # a later request with the same clip
    assert isinstance(first[0], Voice)
    assert first[0] is first[1] is again[0]
    assert cache.prepared == 1
    assert again[0].id == tts.voice_id(reference.id) == tts.prepare_voice(reference).id


def test_the_least_recently_used_voice_is_evicted(serve_app, tts):
    one, two = (decode_reference_audio(voice_wav(seconds)) for seconds in (6.0, 7.0))
    cache = cache_of(tts, capacity=1)
    for reference in (one, two, two, one):
        asyncio.run(cache.resolve([shared(reference)]))
    assert cache.prepared == 3  # `two` was found again; `one` was evicted by it and prepared twice
