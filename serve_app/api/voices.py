"""Saved voices over HTTP, OpenAI-style: `POST /v1/voices` (multipart upload or JSON with base64),
`GET /v1/voices`, `GET /v1/voices/{voice_id}`, `DELETE /v1/voices/{voice_id}`.

The routes are methods of `VoicesRoutes`, which the ingress deployment inherits (Serve binds them
to its replica); the ingress includes `router`. Errors are in OpenAI's shape. An upload is decoded
and normalised here, as a per-request reference is; model replicas prepare its conditionals on first
use and keep them in the store (serve_app.voices.cache).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from chatterbox.errors import TTSInputError
from chatterbox.voice import ReferenceAudio, decode_reference_audio
from serve_app.api.errors import OpenAIErrorResponse, openai_error_response, unexpected_error
from serve_app.api.http_body import CLIP_SCHEMA, media_type, parse_json, read_body
from serve_app.api.openai import decode_reference
from serve_app.config import LimitsConfig
from serve_app.errors import SynthesisError, input_error, validation_error
from serve_app.schemas import VOICE_SCHEMA
from serve_app.voices.store import MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, SavedVoice, VoiceStore

logger = logging.getLogger("ray.serve")

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": OpenAIErrorResponse}}


class VoiceObject(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    name: str
    description: str
    created_at: int
    duration_s: float

    @classmethod
    def of(cls, voice: SavedVoice) -> VoiceObject:
        return cls(
            id=voice.id,
            name=voice.name,
            description=voice.description,
            created_at=voice.created_at,
            duration_s=voice.duration_s,
        )


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceObject]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice.deleted"] = "voice.deleted"
    deleted: bool = True


class VoiceFields(BaseModel):
    """The fields of a multipart upload besides its clip (`file`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=MAX_NAME_CHARS, json_schema_extra=VOICE_SCHEMA)
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)


class VoiceUpload(VoiceFields):
    """JSON body of `POST /v1/voices`."""

    audio: str = Field(
        description="the reference clip (wav, flac, ogg or mp3, > 5 s): base64 or a data: URL",
        json_schema_extra=CLIP_SCHEMA,
    )


# The OpenAPI body of an upload: a multipart form, or the same fields as JSON.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "maxLength": MAX_NAME_CHARS, **VOICE_SCHEMA},
                        "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
                    },
                }
            },
            "application/json": {"schema": VoiceUpload.model_json_schema()},
        },
    }
}


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _answer(work: Awaitable[BaseModel], retry_after_s: int, status: int = 200) -> JSONResponse:
    """`work`'s result as JSON, or its refusal in OpenAI's error shape."""
    try:
        result = await work
    except TTSInputError as error:
        return openai_error_response(input_error(error), retry_after_s)
    except SynthesisError as error:
        return openai_error_response(error, retry_after_s)
    except Exception:
        return openai_error_response(unexpected_error("a /v1/voices route"), retry_after_s)
    return JSONResponse(result.model_dump(), status_code=status)


class VoicesRoutes:
    """The saved-voice routes; the class that inherits them sets these attributes."""

    _voice_store: VoiceStore
    _max_voices: int
    _limits: LimitsConfig

    @router.post(
        "/v1/voices",
        status_code=201,
        response_model=VoiceObject,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_BODY,
    )
    async def create_voice(self, request: Request) -> JSONResponse:
        """Saves a voice from a reference clip under a unique name (201, the voice)."""
        return await _answer(self._create_voice(request), self._limits.retry_after_s, status=201)

    @router.get("/v1/voices", response_model=VoiceList, responses=_ERRORS)
    async def list_voices(self) -> JSONResponse:
        return await _answer(self._list_voices(), self._limits.retry_after_s)

    @router.get("/v1/voices/{voice_id}", response_model=VoiceObject, responses=_ERRORS)
    async def get_voice(self, voice_id: str) -> JSONResponse:
        """A saved voice, by id or name."""
        return await _answer(self._get_voice(voice_id), self._limits.retry_after_s)

    @router.delete("/v1/voices/{voice_id}", response_model=VoiceDeleted, responses=_ERRORS)
    async def delete_voice(self, voice_id: str) -> JSONResponse:
        """Deletes a saved voice (by id or name) for every replica."""
        return await _answer(self._delete_voice(voice_id), self._limits.retry_after_s)

    async def _create_voice(self, request: Request) -> VoiceObject:
        upload, clip, clip_field = await self._read_upload(request)
        limit = self._limits.max_reference_bytes
        if len(clip) > limit:
            raise SynthesisError("reference_too_large", f"{clip_field} exceeds {limit} bytes", clip_field)
        reference: ReferenceAudio = await asyncio.to_thread(
            decode_reference_audio, clip, self._limits.max_reference_seconds, clip_field
        )
        voice = await asyncio.to_thread(
            self._voice_store.create, upload.name, upload.description, reference, self._max_voices
        )
        logger.info("saved voice %s (%s, %.1f s)", voice.id, voice.name, voice.duration_s)
        return VoiceObject.of(voice)

    async def _read_upload(self, request: Request) -> tuple[VoiceFields, bytes, str]:
        """The upload's fields, its clip's bytes and the clip's field name (`file` or `audio`)."""
        if media_type(request) != "multipart/form-data":
            upload = await parse_json(request, VoiceUpload, self._limits.max_request_bytes)
            return upload, decode_reference(upload.audio, "audio") or b"", "audio"
        body = await read_body(request, self._limits.max_request_bytes)
        parser = MultiPartParser(request.headers, _once(body), max_files=1, max_fields=2)
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise SynthesisError("invalid_multipart", f"the multipart body is malformed: {error}") from None
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise SynthesisError("missing_parameter", "file: a multipart file field is required", "file")
            try:
                upload = VoiceFields.model_validate(
                    {key: value for key, value in form.items() if key != "file"}
                )
            except ValidationError as error:
                raise validation_error(error) from None
            return upload, await file.read(), "file"
        finally:
            await form.close()

    async def _list_voices(self) -> VoiceList:
        voices = await asyncio.to_thread(self._voice_store.voices)
        return VoiceList(data=[VoiceObject.of(voice) for voice in voices])

    async def _get_voice(self, voice_id: str) -> VoiceObject:
        return VoiceObject.of(await asyncio.to_thread(self._voice_store.get, voice_id, "voice_id"))

    async def _delete_voice(self, voice_id: str) -> VoiceDeleted:
        voice = await asyncio.to_thread(self._voice_store.delete, voice_id, "voice_id")
        logger.info("deleted voice %s (%s)", voice.id, voice.name)
        return VoiceDeleted(id=voice.id)
