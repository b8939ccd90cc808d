"""The prepared voices of one model replica: an LRU keyed by the engine's voice id.

A request's reference clip reaches a replica as a `SharedReference` (an object-store reference),
a saved voice as a `StoredVoiceReference`. Only on a miss does the replica fetch the clip and
prepare its voice, each new reference once per batch however many of its chunks the batch holds; a
saved voice's conditionals are loaded from the store when this model stored them before, and
stored once prepared, so every replica (and the next deployment) prepares a saved voice once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from chatterbox.voice import ReferenceAudio, Voice
from serve_app.metrics import record_voice_cache_lookups
from serve_app.schemas import SharedReference, StoredVoiceReference
from serve_app.voices.store import VoiceStore

VoiceReference = SharedReference | StoredVoiceReference

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
        # Voices being resolved, by reference id: the chunks of one new voice share one preparation.
        self._resolving: dict[str, asyncio.Future[list[Voice | BaseException]]] = {}
        self.prepared = 0  # voices prepared since the replica started

    async def voice(self, reference: VoiceReference) -> Voice:
        """One chunk's voice: cached, or resolved once for all the chunks that ask for it meanwhile;
        raises the error preparing it raised."""
        key = reference.reference_id
        resolving = self._resolving.get(key)
        if resolving is None:
            resolving = asyncio.ensure_future(self.resolve([reference]))
            self._resolving[key] = resolving
            resolving.add_done_callback(lambda _: self._resolving.pop(key, None))
        # Shielded: one chunk's cancellation does not cancel the others' preparation.
        (voice,) = await asyncio.shield(resolving)
        if isinstance(voice, BaseException):
            raise voice
        return voice

    async def resolve(self, references: Sequence[VoiceReference]) -> list[Voice | BaseException]:
        """The voice of every reference: cached, or fetched and prepared now; a reference whose clip
        cannot be fetched or prepared gets its error instead."""
        ids = [self._voice_id(reference.reference_id) for reference in references]
        outcomes: dict[str, Voice | BaseException] = {}
        missing: dict[str, VoiceReference] = {}
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
            fetched = await asyncio.gather(
                *(self._fetch(voice_id, reference) for voice_id, reference in missing.items()),
                return_exceptions=True,
            )
            # A loaded voice or a fetch error is that voice's outcome; anything else is prepared.
            ready = (Voice, BaseException)
            clips = [clip for clip in fetched if not isinstance(clip, ready)]
            prepared = iter(await self._prepare(clips) if clips else [])
            for (voice_id, reference), clip in zip(missing.items(), fetched, strict=True):
                voice = clip if isinstance(clip, ready) else next(prepared)
                outcomes[voice_id] = voice
                if not isinstance(voice, Voice):
                    continue
                self._remember(voice)
                if voice is not clip:
                    self.prepared += 1
                    if isinstance(reference, StoredVoiceReference):
                        store = VoiceStore(reference.store_dir)
                        await asyncio.to_thread(store.save_conditionals, reference.voice_id, voice)
        return [outcomes[voice_id] for voice_id in ids]

    async def _fetch(self, voice_id: str, reference: VoiceReference) -> ReferenceAudio | Voice:
        """What a missing voice is made from: its clip, or a saved voice's stored conditionals (on
        the CPU: the engine moves a request's voice to its device)."""
        if isinstance(reference, SharedReference):
            return await reference.audio
        store = VoiceStore(reference.store_dir)
        stored = await asyncio.to_thread(store.conditionals, reference.voice_id, voice_id)
        if stored is not None:
            return stored
        return await asyncio.to_thread(store.reference, reference.voice_id)

    def _remember(self, voice: Voice) -> None:
        self._voices[voice.id] = voice
        while len(self._voices) > self._capacity:
            self._voices.popitem(last=False)
