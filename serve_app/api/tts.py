"""`POST /v1/tts`: our own JSON API; the audio comes back whole, in base64 (with its captions if asked).

No `from __future__ import annotations` in route modules: Serve re-creates the route methods for
FastAPI, which then cannot resolve string annotations (a `request: Request` parameter became a
query parameter).
"""

import base64
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.errors import ErrorResponse, error_response, renamed, unexpected_error
from serve_app.api.http_body import BASE64_SCHEMA, decode_base64, json_body, parse_json
from serve_app.config import LimitsConfig
from serve_app.errors import SynthesisError
from serve_app.schemas import ChunkInfo, SynthesisParams, SynthesisRequest
from serve_app.synthesis.audio import AudioFormat
from serve_app.synthesis.captions import CaptionFormat, captions
from serve_app.synthesis.pipeline import Synthesis
from serve_app.voices.store import BUILT_IN_VOICE

router = APIRouter()
# Handle-API field names that this API's clients know under another name.
_HTTP_FIELDS = {"reference_audio": "reference_audio_base64"}


def _tts_schema(schema: dict[str, Any]) -> None:
    """The published schema: a one-off clip, or a saved voice, not both (every example is served)."""
    schema["allOf"] = [
        {
            "if": {
                "properties": {"reference_audio_base64": {"type": "string"}},
                "required": ["reference_audio_base64"],
            },
            "then": {"properties": {"voice": {"enum": [BUILT_IN_VOICE, None]}}},
        }
    ]
    schema["examples"] = [
        {"text": "Hello from Chatterbox Turbo.", "format": "wav", "seed": 7},
        {"text": "Read by the built-in voice, as mp3.", "format": "mp3", "voice": BUILT_IN_VOICE},
    ]


class TTSHttpFields(SynthesisParams):
    """What to synthesise, over HTTP (also the fields of a job)."""

    model_config = ConfigDict(json_schema_extra=_tts_schema)

    reference_audio_base64: str | None = Field(None, json_schema_extra=BASE64_SCHEMA)


class TTSHttpRequest(TTSHttpFields):
    """Body of `POST /v1/tts`."""

    captions: CaptionFormat | None = None  # also answer the captions, in this format


def synthesis_request(body: TTSHttpFields, exclude: frozenset[str] = frozenset()) -> SynthesisRequest:
    """The handle-API request of an HTTP body (its clip decoded; `exclude`: fields of the body only)."""
    clip = body.reference_audio_base64
    return SynthesisRequest(
        **body.model_dump(exclude={"reference_audio_base64", *exclude}),
        reference_audio=None if clip is None else decode_base64(clip, "reference_audio_base64"),
    )


class TTSHttpResponse(BaseModel):
    audio_base64: str
    sample_rate: int
    duration_s: float
    format: AudioFormat
    chunks: list[ChunkInfo]
    captions: str | list[dict[str, str | float]] | None = None  # SRT or WebVTT text, or JSON segments


class TTSRoutes:
    """The route; the ingress that inherits it sets these attributes."""

    _synthesis: Synthesis
    _limits: LimitsConfig

    @router.post(
        "/v1/tts",
        response_model=TTSHttpResponse,
        responses={"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}},
        openapi_extra=json_body(TTSHttpRequest),
    )
    async def tts(self, request: Request) -> JSONResponse:
        accepted_at = time.monotonic()
        try:
            body = await parse_json(request, TTSHttpRequest, self._limits.max_request_bytes)
            synthesis = synthesis_request(body, frozenset({"captions"}))
            result = await self._synthesis.synthesize(synthesis, accepted_at)
        except SynthesisError as error:
            return error_response(renamed(error, _HTTP_FIELDS), self._limits.retry_after_s)
        except Exception:
            return error_response(unexpected_error("POST /v1/tts"), self._limits.retry_after_s)
        response = TTSHttpResponse(
            audio_base64=base64.b64encode(result.audio).decode("ascii"),
            **result.model_dump(exclude={"audio"}),
        )
        if body.captions is None:
            return JSONResponse(response.model_dump(exclude={"captions"}))
        response.captions = captions(result.chunks, result.sample_rate, body.captions)
        return JSONResponse(response.model_dump())
