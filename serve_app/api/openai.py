"""OpenAI-compatible speech API: `POST /v1/audio/speech` and `GET /v1/models`, their schemas, and the
framing of streamed answers (the open-ended WAV header, Server-Sent Events).

A request is translated into our `SynthesisRequest` here; everything after that is the `/v1/tts`
path. No `from __future__ import annotations` (see `serve_app.api.tts`).
"""

import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.errors import (
    OpenAIErrorResponse,
    count_refusal,
    openai_error,
    openai_error_response,
    renamed,
    unexpected_error,
)
from serve_app.api.http_body import CLIP_SCHEMA, decode_base64, json_body, parse_json
from serve_app.config import LimitsConfig
from serve_app.errors import SynthesisError
from serve_app.schemas import TEXT_SCHEMA, VOICE_SCHEMA, AudioPiece, SynthesisParams, SynthesisRequest
from serve_app.synthesis.audio import CONTENT_TYPES, AudioFormat
from serve_app.synthesis.pipeline import Synthesis
from serve_app.voices.store import BUILT_IN_VOICE

router = APIRouter()
SERVED_MODEL_ID = "chatterbox-turbo"
# OpenAI's speech model names, accepted so that existing clients work unchanged; all are Turbo here.
MODEL_ALIASES = frozenset({SERVED_MODEL_ID, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"})
# Formats streamed piece by piece (raw s16le, or WAV with an open-ended header); the compressed
# ones need the whole signal for their encoder and arrive as one body after synthesis.
STREAMED_FORMATS: frozenset[str] = frozenset({"pcm", "wav"})
SSE_CONTENT_TYPE = "text/event-stream"
UNKNOWN_LENGTH = 0xFFFFFFFF  # RIFF and data sizes of a WAV whose length is not known yet


def _speech_schema(schema: dict[str, Any]) -> None:
    """The published schema of a speech request: what `synthesis_request` refuses is outside it
    (OpenAI's values Turbo does not support are accepted by the model only to name them in the error)."""
    properties = schema["properties"]
    properties["model"]["enum"] = sorted(MODEL_ALIASES)
    properties["response_format"]["enum"] = [f for f in properties["response_format"]["enum"] if f != "aac"]
    properties["speed"]["const"] = 1.0
    properties["instructions"] = {"type": "null", "default": None, "title": "Instructions"}
    schema["allOf"] = [
        {  # sse streams only what is streamed
            "if": {"properties": {"stream_format": {"const": "sse"}}, "required": ["stream_format"]},
            "then": {
                "properties": {"response_format": {"enum": sorted(STREAMED_FORMATS)}},
                "required": ["response_format"],
            },
        },
        {  # a one-off clip, or a saved voice, not both
            "if": {"properties": {"reference_audio": {"type": "string"}}, "required": ["reference_audio"]},
            "then": {"properties": {"voice": {"const": BUILT_IN_VOICE}}},
        },
    ]
    schema["examples"] = [
        {"model": SERVED_MODEL_ID, "input": "Hello from Chatterbox Turbo.", "voice": "default"},
        {
            "model": SERVED_MODEL_ID,
            "input": "Streamed as it is made.",
            "voice": "default",
            "response_format": "pcm",
            "stream_format": "sse",
            "seed": 7,
        },
    ]


class SpeechRequest(BaseModel):
    """Body of `POST /v1/audio/speech`: OpenAI's fields, then Turbo's sampling and one-off cloning."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_speech_schema)

    model: str
    input: str = Field(json_schema_extra=TEXT_SCHEMA)
    voice: str = Field(
        BUILT_IN_VOICE,
        description="'default' (built in), or a saved voice's id or name",
        json_schema_extra=VOICE_SCHEMA,
    )
    response_format: Literal["wav", "flac", "mp3", "opus", "pcm", "aac"] = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = SynthesisParams.model_fields["seed"]
    temperature: float = SynthesisParams.model_fields["temperature"]
    top_p: float = SynthesisParams.model_fields["top_p"]
    top_k: int = SynthesisParams.model_fields["top_k"]
    repetition_penalty: float = SynthesisParams.model_fields["repetition_penalty"]
    reference_audio: str | None = Field(
        None, description="one-off voice: base64 or a data: URL of a clip", json_schema_extra=CLIP_SCHEMA
    )

    def synthesis_request(self) -> SynthesisRequest:
        """Our request for this one; raises SynthesisError for what Turbo cannot do."""
        if self.model not in MODEL_ALIASES:
            raise SynthesisError(
                "model_not_found", f"model {self.model!r} is not served; use {SERVED_MODEL_ID!r}", "model"
            )
        if self.response_format == "aac":
            raise SynthesisError(
                "unsupported_value",
                "response_format 'aac' is not supported: use wav, flac, mp3, opus or pcm",
                "response_format",
            )
        if self.speed != 1.0:
            raise SynthesisError("unsupported_value", "speed: only 1.0 is supported", "speed")
        if self.instructions is not None:
            raise SynthesisError(
                "unsupported_value",
                "instructions are not supported: Turbo has no instruction control",
                "instructions",
            )
        if self.stream_format == "sse" and self.response_format not in STREAMED_FORMATS:
            raise SynthesisError(
                "unsupported_value", "stream_format 'sse' needs response_format pcm or wav", "stream_format"
            )
        params = self.model_dump(include={"seed", "temperature", "top_p", "top_k", "repetition_penalty"})
        return SynthesisRequest(
            text=self.input,
            voice=self.voice,
            format=self.response_format,
            reference_audio=decode_reference(self.reference_audio),
            **params,
        )

    @property
    def streamed(self) -> bool:
        return self.stream_format == "sse" or self.response_format in STREAMED_FORMATS


def decode_reference(value: str | None, field: str = "reference_audio") -> bytes | None:
    """An audio clip field (`field`) as bytes: plain base64, or a `data:<type>;base64,<data>` URL."""
    if value is None:
        return None
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise SynthesisError(
                "invalid_base64", f"{field}: a data URL must be base64 (data:<type>;base64,...)", field
            )
    return decode_base64(value, field)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "resemble-ai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 44-byte PCM16 mono WAV header whose sizes say "unknown" (0xFFFFFFFF), as OpenAI streams
    WAV: the length is only known after the last chunk."""
    byte_rate = sample_rate * 2
    return (
        b"RIFF"
        + struct.pack("<I", UNKNOWN_LENGTH)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, 2, 16)
        + b"data"
        + struct.pack("<I", UNKNOWN_LENGTH)
    )


def sse_event(payload: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def audio_delta_event(audio: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})


def stream_content_type(audio_format: AudioFormat, stream_format: str) -> str:
    return SSE_CONTENT_TYPE if stream_format == "sse" else CONTENT_TYPES[audio_format]


def done_event(text: str, num_samples: int, sample_rate: int, first_audio_s: float, total_s: float) -> bytes:
    """The last event of an SSE stream: usage (Turbo counts no tokens) and timings."""
    return sse_event(
        {
            "type": "speech.audio.done",
            "usage": {"input_characters": len(text), "output_audio_seconds": num_samples / sample_rate},
            "timings": {"time_to_first_audio_s": first_audio_s, "total_s": total_s},
        }
    )


# Handle-API field names that OpenAI's clients know under another name.
_OPENAI_FIELDS = {"text": "input", "format": "response_format"}


class OpenAIRoutes:
    """The routes; the ingress that inherits them sets these attributes."""

    _synthesis: Synthesis
    _limits: LimitsConfig

    @router.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        """OpenAI-compatible: the served model (OpenAI's speech model names are accepted as aliases)."""
        return ModelList(data=[ModelCard(id=SERVED_MODEL_ID)])

    @router.post(
        "/v1/audio/speech",
        responses={
            200: {
                "description": "the audio: a whole file, or a stream (pcm, wav, or Server-Sent Events)",
                "content": {t: {} for t in (*CONTENT_TYPES.values(), SSE_CONTENT_TYPE)},
            },
            "4XX": {"model": OpenAIErrorResponse},
            "5XX": {"model": OpenAIErrorResponse},
        },
        openapi_extra=json_body(SpeechRequest),
    )
    async def speech(self, request: Request) -> Response:
        """OpenAI-compatible speech. pcm and wav (and `stream_format=sse`) are streamed in order as
        chunks finish; flac, mp3 and opus arrive whole. Errors are in OpenAI's shape."""
        accepted_at = time.monotonic()
        try:
            speech = await parse_json(request, SpeechRequest, self._limits.max_request_bytes)
            synthesis = speech.synthesis_request()
            if speech.streamed:
                return await self._streaming_response(speech, synthesis, accepted_at)
            result = await self._synthesis.synthesize(synthesis, accepted_at)
        except SynthesisError as error:
            return openai_error_response(renamed(error, _OPENAI_FIELDS), self._limits.retry_after_s)
        except Exception:
            error = unexpected_error("POST /v1/audio/speech")
            return openai_error_response(error, self._limits.retry_after_s)
        return Response(result.audio, media_type=CONTENT_TYPES[result.format])

    async def _streaming_response(
        self, speech: SpeechRequest, synthesis: SynthesisRequest, accepted_at: float
    ) -> StreamingResponse:
        """Waits for the first piece, so that a refusal is still an HTTP error; then streams."""
        pieces = self._synthesis.stream(synthesis, accepted_at)
        try:
            first = await anext(pieces)
        except BaseException:
            await pieces.aclose()
            raise
        body = _stream_body(speech, synthesis.text, first, pieces, accepted_at)
        return StreamingResponse(body, media_type=stream_content_type(synthesis.format, speech.stream_format))


async def _stream_body(
    speech: SpeechRequest,
    text: str,
    first: AudioPiece,
    pieces: AsyncIterator[AudioPiece],
    accepted_at: float,
) -> AsyncIterator[bytes]:
    """The streamed body: raw audio (a WAV header first) or SSE events, from `first` on."""
    sse = speech.stream_format == "sse"
    header = streaming_wav_header(first.sample_rate) if speech.response_format == "wav" else b""
    first_audio_s = time.monotonic() - accepted_at
    piece: AudioPiece | None = first
    num_samples = 0
    try:
        while piece is not None:
            audio, header = header + piece.audio, b""
            yield audio_delta_event(audio) if sse else audio
            num_samples += piece.num_samples
            piece = await anext(pieces, None)
    except SynthesisError as error:
        count_refusal(error.code, error.status)
        if not sse:
            raise  # the connection is dropped mid-body: the client sees a broken stream
        yield sse_event({"type": "error", **openai_error(error)[0].model_dump()})
        return
    finally:
        await pieces.aclose()
    if sse:
        yield done_event(text, num_samples, first.sample_rate, first_audio_s, time.monotonic() - accepted_at)
