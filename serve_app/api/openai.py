"""OpenAI-compatible speech API (`POST /v1/audio/speech`, `GET /v1/models`): its request and error
schemas and pure helpers (content types, the streamed WAV header, Server-Sent Events, the error
response of every OpenAI route).

A request is translated into our `SynthesisRequest` here; everything after that is the `/v1/tts` path.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.synthesis.audio import AudioFormat
from serve_app.errors import SynthesisError
from serve_app.metrics import record_refusal
from serve_app.schemas import SynthesisParams, SynthesisRequest
from serve_app.voices.store import BUILT_IN_VOICE

SERVED_MODEL_ID = "chatterbox-turbo"
# OpenAI's speech model names, accepted so that existing clients work unchanged; all are Turbo here.
MODEL_ALIASES = frozenset({SERVED_MODEL_ID, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"})
# Formats streamed piece by piece (raw s16le, or WAV with an open-ended header); the compressed
# ones need the whole signal for their encoder and arrive as one body after synthesis.
STREAMED_FORMATS: frozenset[str] = frozenset({"pcm", "wav"})
CONTENT_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Ogg Opus, as OpenAI sends it
    "pcm": "audio/pcm",
}
SSE_CONTENT_TYPE = "text/event-stream"
UNKNOWN_LENGTH = 0xFFFFFFFF  # RIFF and data sizes of a WAV whose length is not known yet


class SpeechRequest(BaseModel):
    """Body of `POST /v1/audio/speech`: OpenAI's fields, then Turbo's sampling and one-off cloning."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
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
        },
    )

    model: str
    input: str
    voice: str = Field(BUILT_IN_VOICE, description="'default' (built in), or a saved voice's id or name")
    response_format: Literal["wav", "flac", "mp3", "opus", "pcm", "aac"] = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = SynthesisParams.model_fields["seed"]
    temperature: float = SynthesisParams.model_fields["temperature"]
    top_p: float = SynthesisParams.model_fields["top_p"]
    top_k: int = SynthesisParams.model_fields["top_k"]
    repetition_penalty: float = SynthesisParams.model_fields["repetition_penalty"]
    reference_audio: str | None = Field(None, description="one-off voice: base64 or a data: URL of a clip")

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
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SynthesisError("invalid_base64", f"{field} is not valid base64: {error}", field) from None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "resemble-ai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, which its clients turn into their typed exceptions."""

    error: OpenAIErrorDetail


def openai_error(error: SynthesisError) -> tuple[OpenAIErrorResponse, int]:
    """Our error in OpenAI's shape and status: a refused input is 400 there (ours: 422)."""
    status = 400 if error.status == 422 else error.status
    if status < 500:
        kind = "invalid_request_error"
    elif error.code == "overloaded":
        kind = "overloaded_error"
    else:
        kind = "server_error"
    detail = OpenAIErrorDetail(message=error.message, type=kind, param=error.field, code=error.code)
    return OpenAIErrorResponse(error=detail), status


def openai_error_response(error: SynthesisError) -> JSONResponse:
    """The HTTP answer of an OpenAI route's refusal, counted in the refusals metric."""
    body, status = openai_error(error)
    record_refusal(error.code, status)
    return JSONResponse(body.model_dump(), status_code=status)


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
