"""The prepared voices of one model replica: an LRU keyed by the engine's voice id.

A request's reference clip reaches a replica as a `SharedReference` (an object-store reference).
The replica fetches the clip and prepares its voice only on a miss, each new reference once per
batch however many of its chunks the batch holds.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from chatterbox.voice import ReferenceAudio, Voice
from serve_app.metrics import record_voice_cache_lookups
from serve_app.schemas import SharedReference

# Prepares clips into voices, one outcome per clip: its voice or the error it alone raises.
PrepareVoices = Callable[[list[ReferenceAudio]], Awaitable[list[Voice | Exception]]]


class VoiceCache:
    """Voices under the id the engine gives them (`TurboTTS.voice_id`): lookup and storage use that
    one id, so a voice prepared once is found again."""

    def __init__(self, capacity: int, voice_id: Callable[[str], str], prepare: PrepareVoices) -> None:
        self._capacity = capacity
        self._voice_id = voice_id
        self._prepare = prepare
        self._voices: OrderedDict[str, Voice] = OrderedDict()
        self.prepared = 0  # voices prepared since the replica started

    async def resolve(self, references: Sequence[SharedReference]) -> list[Voice | BaseException]:
        """The voice of every reference: cached, or fetched and prepared now; a reference whose clip
        cannot be fetched or prepared gets its error instead."""
        ids = [self._voice_id(reference.reference_id) for reference in references]
        outcomes: dict[str, Voice | BaseException] = {}
        missing: dict[str, SharedReference] = {}
        for voice_id, reference in zip(ids, references, strict=True):
            if voice_id in outcomes or voice_id in missing:
                continue
            cached = self._voices.get(voice_id)
            if cached is not None:
                self._voices.move_to_end(voice_id)
                outcomes[voice_id] = cached
            else:
                missing[voice_id] = reference
        record_voice_cache_lookups(hits=len(outcomes), misses=len(missing))  # each voice once per batch
        if missing:
            fetched = await asyncio.gather(*(r.audio for r in missing.values()), return_exceptions=True)
            prepared = iter(await self._prepare([c for c in fetched if not isinstance(c, BaseException)]))
            for voice_id, clip in zip(missing, fetched, strict=True):
                voice = clip if isinstance(clip, BaseException) else next(prepared)
                outcomes[voice_id] = voice
                if isinstance(voice, Voice):
                    self._remember(voice)
        return [outcomes[voice_id] for voice_id in ids]

    def _remember(self, voice: Voice) -> None:
        self._voices[voice.id] = voice
        self.prepared += 1
        while len(self._voices) > self._capacity:
            self._voices.popitem(last=False)
