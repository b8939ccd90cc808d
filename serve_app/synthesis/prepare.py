"""A request made ready for the model: its text checked and split into chunks, one seed per chunk,
its voice resolved (a saved voice, its reference clip decoded once, or the built-in one), and the
plan its chunks are stitched by."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import replace

import ray
from ray.serve.handle import DeploymentHandle

from chatterbox.errors import TTSInputError
from chatterbox.voice import decode_reference_audio
from serve_app.deployments.args import IngressArgs
from serve_app.errors import SynthesisError, input_error
from serve_app.schemas import (
    FORBIDDEN_TEXT_CHARS,
    ChunkJob,
    ModelInfo,
    SharedReference,
    StoredVoiceReference,
    SynthesisRequest,
)
from serve_app.synthesis.audio import StitchPlan, stitch_plan
from serve_app.synthesis.chunking import split_text
from serve_app.voices.store import VoiceStore

FORBIDDEN_TEXT = re.compile(f"[{FORBIDDEN_TEXT_CHARS}]")


def check_text(text: str) -> None:
    """Refuse text with a character that cannot be spoken or encoded (``FORBIDDEN_TEXT_CHARS``)."""
    found = FORBIDDEN_TEXT.search(text)
    if found:
        raise SynthesisError(
            "invalid_parameter",
            f"text: character U+{ord(found.group()):04X} at index {found.start()} is not allowed "
            "(control characters other than tab and newlines, and lone surrogates)",
            "text",
        )


class Preparer:
    """Turns requests into chunk jobs and stitch plans for one ingress replica."""

    def __init__(self, model: DeploymentHandle, config: IngressArgs, voice_store: VoiceStore) -> None:
        self._model = model
        self._config = config
        self._voice_store = voice_store
        self._model_info: ModelInfo | None = None

    async def prepare(self, request: SynthesisRequest) -> tuple[list[ChunkJob], StitchPlan]:
        """Check the request and make its chunk jobs (the built-in or its decoded voice) and stitch plan."""
        limits = self._config.limits
        check_text(request.text)
        if len(request.text) > limits.max_text_chars:
            raise SynthesisError(
                "text_too_long",
                f"text has {len(request.text)} characters; the limit is {limits.max_text_chars}",
                "text",
            )
        info = await self._get_model_info()
        chunks = split_text(request.text, self._config.chunking.max_chunk_chars, info.max_text_tokens)
        if not chunks:
            raise SynthesisError("empty_text", "text is empty", "text")
        try:
            sampling = request.sampling(self._config.max_new_tokens)
        except TTSInputError as error:
            raise input_error(error) from None
        voice = await self._voice(request)
        request_id = uuid.uuid4().hex
        jobs = [
            ChunkJob(
                request_id=request_id,
                text=chunk.text,
                voice=voice,
                sampling=sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i),
            )
            for i, chunk in enumerate(chunks)
        ]
        return jobs, stitch_plan(chunks, self._config.stitching, info.sample_rate, request.format)

    async def _get_model_info(self) -> ModelInfo:
        if self._model_info is None:
            self._model_info = await self._model.info.remote()
        return self._model_info

    async def _voice(self, request: SynthesisRequest) -> SharedReference | StoredVoiceReference | None:
        """The request's voice: a saved one (by id or name), its reference clip, or None (built in)."""
        if request.voice is None:
            return await self._shared_reference(request.reference_audio)
        if request.reference_audio is not None:
            raise SynthesisError(
                "invalid_parameter", "voice: send a saved voice or a reference clip, not both", "voice"
            )
        try:
            saved = await asyncio.to_thread(self._voice_store.get, request.voice, "voice")
        except TTSInputError as error:
            raise input_error(error) from None
        return StoredVoiceReference(
            reference_id=saved.reference_id, store_dir=str(self._voice_store.root), voice_id=saved.id
        )

    async def _shared_reference(self, reference_audio: bytes | None) -> SharedReference | None:
        """Decode and check the reference once; replicas receive only an object reference to it."""
        if reference_audio is None:
            return None
        limits = self._config.limits
        if len(reference_audio) > limits.max_reference_bytes:
            raise SynthesisError(
                "reference_too_large",
                f"reference audio exceeds {limits.max_reference_bytes} bytes",
                "reference_audio",
            )
        try:
            reference = await asyncio.to_thread(
                decode_reference_audio, reference_audio, limits.max_reference_seconds
            )
        except TTSInputError as error:
            raise input_error(error) from None
        return SharedReference(reference_id=reference.id, audio=ray.put(reference))
