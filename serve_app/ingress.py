"""Ingress deployment: the HTTP API and the handle API of the TTS service.

A request reads top to bottom: validate, split the text into chunks, decode the reference audio
once, send every chunk to the model deployment at once, hand the pending results to the stitcher.
Every refusal is a `SynthesisError`, answered over HTTP as 4xx JSON `{"error": {...}}`.

No `from __future__ import annotations` here: Serve re-creates the route methods for FastAPI, which
then cannot resolve string annotations (a `request: Request` parameter became a query parameter).
"""

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from chatterbox.errors import TTSInputError
from chatterbox.voice import decode_reference_audio
from serve_app.audio import ms_to_samples
from serve_app.chunking import TextChunk, split_text
from serve_app.config import AppArgs, ChunkingConfig, LimitsConfig, StitchingConfig, front_deployment_options
from serve_app.schemas import (
    ChunkJob,
    ChunkOutOfMemoryError,
    ErrorDetail,
    ErrorResponse,
    ModelInfo,
    StitchPlan,
    SynthesisError,
    SynthesisRequest,
    SynthesisResult,
    TTSHttpRequest,
    TTSHttpResponse,
    VoiceRef,
)

logger = logging.getLogger("ray.serve")

api = FastAPI(title="Chatterbox Turbo TTS", version="1")

# HTTP status of each engine input-error code; a code not listed here is a 422.
_INPUT_ERROR_STATUS = {"text_too_long": 413}
# Handle-API field names that HTTP clients know under another name.
_HTTP_FIELDS = {"reference_audio": "reference_audio_base64"}


def input_error(error: TTSInputError) -> SynthesisError:
    return SynthesisError(_INPUT_ERROR_STATUS.get(error.code, 422), error.code, str(error), error.field)


def root_cause(error: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrappers (one per hop: model -> stitcher -> here)."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def lost_replica(error: BaseException) -> bool:
    """Whether a replica on the request's path died: the stitcher's own death, or (as Serve reports it)
    a RayServeException caused by the death of a model replica whose audio the stitcher awaited."""
    return isinstance(error, RayActorError) or isinstance(error.__cause__, RayActorError)


def validation_error(error: ValidationError) -> SynthesisError:
    """The first pydantic error as `invalid_parameter` (or `missing_parameter`) naming its field."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    code = "missing_parameter" if first["type"] == "missing" else "invalid_parameter"
    return SynthesisError(422, code, f"{field or 'body'}: {first['msg']}", field)


def error_response(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status)


@api.exception_handler(HTTPException)
async def http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown route, wrong method) in our error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_response(error.status_code, code, str(error.detail))


@serve.ingress(api)
class Ingress:
    @classmethod
    def get_deployment_options(cls, args: AppArgs) -> dict[str, Any]:
        options = front_deployment_options(cls.__name__, args.ingress, args.shutdown)
        return {**options, "max_queued_requests": args.ingress.max_queued_requests}

    def __init__(
        self,
        model: DeploymentHandle,
        stitcher: DeploymentHandle,
        chunking: ChunkingConfig,
        stitching: StitchingConfig,
        limits: LimitsConfig,
    ) -> None:
        self._model = model
        self._stitcher = stitcher
        self._chunking = chunking
        self._stitching = stitching
        self._limits = limits
        self._model_info: ModelInfo | None = None
        self._active_requests = 0

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/tts", response_model=TTSHttpResponse, responses={"4XX": {"model": ErrorResponse}})
    async def tts(self, request: Request) -> JSONResponse:
        try:
            synthesis = await self._parse_http_request(request)
            result = await self.synthesize(synthesis)
        except SynthesisError as error:
            field = _HTTP_FIELDS.get(error.field, error.field)
            response = error_response(error.status, error.code, error.message, field)
            if error.status in (429, 503):  # refused for now, not for good: say when to come back
                response.headers["Retry-After"] = str(self._limits.retry_after_s)
            return response
        except Exception:
            logger.exception("unexpected error in POST /v1/tts")
            return error_response(500, "internal_error", "internal error; see the server log")
        response = TTSHttpResponse(
            audio_base64=base64.b64encode(result.audio).decode("ascii"),
            **result.model_dump(exclude={"audio"}),
        )
        return JSONResponse(response.model_dump())

    async def synthesize(self, request: SynthesisRequest) -> SynthesisResult:
        """The handle API. Raises SynthesisError for a request it refuses or cannot serve."""
        with self._admitted():
            return await self._synthesize(request)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Holds one of `limits.max_active_requests` slots; without a free one, refuses at once: waiting
        behind that many requests would take longer than a client should wait."""
        limit = self._limits.max_active_requests
        if limit is not None and self._active_requests >= limit:
            raise SynthesisError(
                503, "overloaded", f"the service is busy ({limit} requests in progress); retry later"
            )
        self._active_requests += 1
        try:
            yield
        finally:
            self._active_requests -= 1

    async def _synthesize(self, request: SynthesisRequest) -> SynthesisResult:
        if len(request.text) > self._limits.max_text_chars:
            raise SynthesisError(
                413,
                "text_too_long",
                f"text has {len(request.text)} characters; the limit is {self._limits.max_text_chars}",
                "text",
            )
        info = await self._get_model_info()
        chunks = split_text(request.text, self._chunking.max_chunk_chars, info.max_text_tokens)
        if not chunks:
            raise SynthesisError(422, "empty_text", "text is empty", "text")
        voice = await self._resolve_voice(request.reference_audio)
        jobs = [
            ChunkJob(
                text=chunk.text,
                voice=voice,
                seed=None if request.seed is None else request.seed + i,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                repetition_penalty=request.repetition_penalty,
            )
            for i, chunk in enumerate(chunks)
        ]
        chunk_audio = [self._model.synthesize_chunk.remote(job) for job in jobs]
        plan = self._stitch_plan(chunks, info.sample_rate, request.format)
        try:
            return await self._stitcher.stitch.remote(plan, *chunk_audio)
        except (TTSInputError, ChunkOutOfMemoryError) as error:
            cause = root_cause(error)
            if isinstance(cause, TTSInputError):
                raise input_error(cause) from None
            raise SynthesisError(503, "out_of_memory", str(cause)) from None
        except Exception as error:
            if not lost_replica(error):
                raise
            raise SynthesisError(
                503, "replica_unavailable", "a replica failed while serving this request; retry it"
            ) from None

    async def _get_model_info(self) -> ModelInfo:
        if self._model_info is None:
            self._model_info = await self._model.info.remote()
        return self._model_info

    async def _parse_http_request(self, request: Request) -> SynthesisRequest:
        limit = self._limits.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise SynthesisError(413, "request_too_large", f"request body exceeds {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise SynthesisError(413, "request_too_large", f"request body exceeds {limit} bytes")
        try:
            payload = json.loads(body)
        except ValueError as error:
            raise SynthesisError(400, "invalid_json", f"request body is not valid JSON: {error}") from None
        try:
            http_request = TTSHttpRequest.model_validate(payload)
        except ValidationError as error:
            raise validation_error(error) from None
        reference = None
        if http_request.reference_audio_base64 is not None:
            try:
                reference = base64.b64decode(http_request.reference_audio_base64, validate=True)
            except binascii.Error as error:
                raise SynthesisError(
                    400,
                    "invalid_base64",
                    f"reference_audio_base64 is not valid base64: {error}",
                    "reference_audio_base64",
                ) from None
        params = http_request.model_dump(exclude={"reference_audio_base64"})
        return SynthesisRequest(**params, reference_audio=reference)

    async def _resolve_voice(self, reference_audio: bytes | None) -> VoiceRef | None:
        """Decode and check the reference once; replicas receive only an object reference to it."""
        if reference_audio is None:
            return None
        limit = self._limits.max_reference_bytes
        if len(reference_audio) > limit:
            raise SynthesisError(
                413, "reference_too_large", f"reference audio exceeds {limit} bytes", "reference_audio"
            )
        try:
            reference = await asyncio.to_thread(
                decode_reference_audio, reference_audio, self._limits.max_reference_seconds
            )
        except TTSInputError as error:
            raise SynthesisError(422, error.code, str(error), "reference_audio") from None
        return VoiceRef(voice_id=reference.id, audio=ray.put(reference))

    def _stitch_plan(self, chunks: list[TextChunk], sample_rate: int, audio_format: str) -> StitchPlan:
        pause_ms = {
            "paragraph": self._stitching.paragraph_pause_ms,
            "sentence": self._stitching.sentence_pause_ms,
        }
        return StitchPlan(
            chunk_texts=[c.text for c in chunks],
            pauses=[ms_to_samples(pause_ms.get(c.break_after, 0.0), sample_rate) for c in chunks[:-1]],
            crossfade=ms_to_samples(self._stitching.crossfade_ms, sample_rate),
            sample_rate=sample_rate,
            format=audio_format,
        )
