"""Ingress deployment: the HTTP API and the handle API of the TTS service.

A request reads top to bottom: validate, split the text into chunks, decode the reference audio
once, send the chunks to the model deployment (a few at a time), hand their results to the stitcher.
Every refusal is a `SynthesisError`, answered over HTTP as 4xx JSON `{"error": {...}}`.

No `from __future__ import annotations` here: Serve re-creates the route methods for FastAPI, which
then cannot resolve string annotations (a `request: Request` parameter became a query parameter).
"""

import asyncio
import base64
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.schema import DeploymentStatus, ReplicaState
from starlette.exceptions import HTTPException

from chatterbox.errors import TTSInputError
from chatterbox.voice import decode_reference_audio
from serve_app.synthesis.audio import StitchPlan, StreamingStitch, stitch_plan
from serve_app.api.auth import ApiKeyMiddleware, ApiKeys, load_api_keys
from serve_app.synthesis.chunking import split_text
from serve_app.config import (
    AppArgs,
    AuthConfig,
    ChunkingConfig,
    LimitsConfig,
    StitchingConfig,
    VoicesConfig,
    front_deployment_options,
)
from serve_app.errors import (
    SynthesisError,
    error_response,
    error_status,
    input_error,
    model_error,
    validation_error,
)
from serve_app.api.http_body import read_json
from serve_app.metrics import record_refusal, record_time_to_first_audio
from serve_app.api.openai import (
    CONTENT_TYPES,
    SERVED_MODEL_ID,
    SSE_CONTENT_TYPE,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    SpeechRequest,
    audio_delta_event,
    openai_error,
    openai_error_response,
    sse_event,
    stream_content_type,
    streaming_wav_header,
)
from serve_app.api.playground import STATIC_DIR, render_page
from serve_app.schemas import (
    AudioPiece,
    ChunkJob,
    ErrorResponse,
    ModelInfo,
    SharedReference,
    StoredVoiceReference,
    SynthesisRequest,
    SynthesisResult,
    TTSHttpRequest,
    TTSHttpResponse,
)
from serve_app.voices.store import VoiceStore
from serve_app.api.voices import VoicesRoutes
from serve_app.api.voices import router as voices_router

logger = logging.getLogger("ray.serve")

api = FastAPI(title="Chatterbox Turbo TTS", version="1")
api.include_router(voices_router)
api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # the playground's files
# The keys are the replica's (loaded by Ingress.__init__, in the replica's process).
api.add_middleware(ApiKeyMiddleware, keys=lambda: serve.get_replica_context().servable_object.api_keys)

# How long /readyz waits for Serve's controller to report the model deployment's state.
READINESS_TIMEOUT_S = 5.0
# Shortest piece a stream sends before its last: fewer, larger pieces, each long enough to watermark.
MIN_PIECE_SECONDS = 0.1
# The watermark keeps a piece's length only when it is a multiple of 10 ms (PerTh's STFT hop at
# 32 kHz), so a streamed chunk is cut at such multiples.
PIECE_GRANULE_SECONDS = 0.01
# Handle-API field names that HTTP clients know under another name, per endpoint.
_HTTP_FIELDS = {"reference_audio": "reference_audio_base64"}
_OPENAI_FIELDS = {"text": "input", "format": "response_format"}


async def _first_finished(running: dict[asyncio.Future, DeploymentResponse]) -> None:
    """Wait until a call in `running` finishes and remove it; raise its error if it failed."""
    finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    for waiter in finished:
        del running[waiter]
    for waiter in finished:
        waiter.result()


def _record_first_audio(accepted_at: float) -> Callable[[asyncio.Future], None]:
    """A done callback for a request's first chunk call: its audio is ready, the earliest a
    streamed response can send audio."""

    def record(call: asyncio.Future) -> None:
        if not call.cancelled() and call.exception() is None:
            record_time_to_first_audio(time.monotonic() - accepted_at)

    return record


async def finished_in_order(
    model: DeploymentHandle, jobs: list[ChunkJob], max_in_flight: int, accepted_at: float | None
) -> AsyncIterator[tuple[asyncio.Future, DeploymentResponse]]:
    """The `model.synthesize_chunk` calls of `jobs`, each (its result future, its response) yielded
    in order once it and every call before it have finished; the first one's finishing is recorded
    as the request's time to first audio (since `accepted_at`; None: its first audio comes from
    elsewhere).

    At most `max_in_flight` calls of one request run at once, the next sent as an earlier
    one finishes, so a long text does not fill every replica's queue ahead of later requests.
    When one call fails or this request is cancelled (its client went away), the calls still
    running are cancelled: awaiting a response and being cancelled does not cancel its call.
    """
    calls: list[tuple[asyncio.Future, DeploymentResponse]] = []
    running: dict[asyncio.Future, DeploymentResponse] = {}
    yielded = 0
    try:
        for job in jobs:
            if len(running) >= max_in_flight:
                await _first_finished(running)
            response = model.synthesize_chunk.remote(job)
            call = asyncio.ensure_future(response)
            if not calls and accepted_at is not None:
                call.add_done_callback(_record_first_audio(accepted_at))
            calls.append((call, response))
            running[call] = response
            while yielded < len(calls) and calls[yielded][0].done():
                calls[yielded][0].result()  # raises the call's error
                yield calls[yielded]
                yielded += 1
        for call, response in calls[yielded:]:
            while not call.done():
                await _first_finished(running)
            call.result()
            yield call, response
    finally:
        for waiter, response in running.items():
            response.cancel()
            waiter.cancel()


# Characters no speech text has and that break encoders downstream: C0/C1 controls other than tab,
# newline and carriage return, and lone surrogates (JSON "\ud800" decodes to one; UTF-8 has none).
_FORBIDDEN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(text: str) -> None:
    """Refuse text with a character that cannot be spoken or encoded (see ``_FORBIDDEN_TEXT``)."""
    found = _FORBIDDEN_TEXT.search(text)
    if found:
        raise SynthesisError(
            "invalid_parameter",
            f"text: character U+{ord(found.group()):04X} at index {found.start()} is not allowed "
            "(control characters other than tab and newlines, and lone surrogates)",
            "text",
        )


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that reads its JSON itself (to bound and check it first)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@contextlib.contextmanager
def _counting_refusals() -> Iterator[None]:
    """Counts a handle-API call's refusal in the metrics (HTTP counts its refusals where it answers)."""
    try:
        yield
    except SynthesisError as error:
        record_refusal(error.code, error.status)
        raise
    except Exception:
        record_refusal("internal_error", error_status("internal_error"))
        raise


@api.exception_handler(HTTPException)
async def http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown route, wrong method) in our error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_response(SynthesisError(code, str(error.detail)), status=error.status_code)


@serve.ingress(api)
class Ingress(VoicesRoutes):
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
        voices: VoicesConfig,
        auth: AuthConfig,
        max_new_tokens: int,
        max_chunks_in_flight: int,
    ) -> None:
        self._model = model
        self._stitcher = stitcher
        self._chunking = chunking
        self._stitching = stitching
        self._limits = limits
        self._max_new_tokens = max_new_tokens
        self._max_chunks_in_flight = max_chunks_in_flight
        self._model_info: ModelInfo | None = None
        self._active_requests = 0
        self._app_name = serve.get_replica_context().app_name
        self._voice_store = VoiceStore(voices.store_dir)
        self._max_voices = voices.max_voices
        self._voice_store.sweep()
        self.api_keys: ApiKeys = load_api_keys(auth)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request) -> HTMLResponse:
        """The playground page (`serve_app.api.playground`), for the route prefix the app is mounted at."""
        return HTMLResponse(render_page(request.scope.get("root_path", "")))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: this ingress answers (asks nothing of the model)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Readiness: Serve's controller has a running model replica that passes its health checks
        (``TurboModel.check_health``, which a broken replica fails).

        Asked of the controller, not of a replica: a replica's calls queue behind its chunk calls,
        so a probe sent to a busy replica would time out exactly when the service is busiest.
        """
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), READINESS_TIMEOUT_S)
            deployment = status.applications[self._app_name].deployments[self._model.deployment_name]
        except Exception as error:
            logger.warning("not ready: %r", error)
            return error_response(SynthesisError("not_ready", f"Serve's status is unavailable: {error}"))
        running = deployment.replica_states.get(ReplicaState.RUNNING, 0)
        if running == 0 or deployment.status in (DeploymentStatus.UNHEALTHY, DeploymentStatus.DEPLOY_FAILED):
            detail = deployment.message or "none running"
            message = f"no healthy model replica ({deployment.status.value}: {detail})"
            return error_response(SynthesisError("not_ready", message))
        return JSONResponse({"status": "ready"})

    @api.post(
        "/v1/tts",
        response_model=TTSHttpResponse,
        responses={"4XX": {"model": ErrorResponse}},
        openapi_extra=json_body(TTSHttpRequest),
    )
    async def tts(self, request: Request) -> JSONResponse:
        accepted_at = time.monotonic()
        try:
            synthesis = await self._parse_http_request(request)
            result = await self._serve(synthesis, accepted_at)
        except SynthesisError as error:
            field = _HTTP_FIELDS.get(error.field, error.field)
            response = error_response(SynthesisError(error.code, error.message, field))
            return self._with_retry_after(response)
        except Exception:
            logger.exception("unexpected error in POST /v1/tts")
            return error_response(SynthesisError("internal_error", "internal error; see the server log"))
        response = TTSHttpResponse(
            audio_base64=base64.b64encode(result.audio).decode("ascii"),
            **result.model_dump(exclude={"audio"}),
        )
        return JSONResponse(response.model_dump())

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        """OpenAI-compatible: the served model (OpenAI's speech model names are accepted as aliases)."""
        return ModelList(data=[ModelCard(id=SERVED_MODEL_ID)])

    @api.post(
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
            try:
                speech = SpeechRequest.model_validate(await self._read_json(request))
            except ValidationError as error:
                raise validation_error(error) from None
            synthesis = speech.synthesis_request()
            if speech.streamed:
                return await self._streaming_response(speech, synthesis, accepted_at)
            result = await self._serve(synthesis, accepted_at)
        except SynthesisError as error:
            return self._openai_error_response(error)
        except Exception:
            logger.exception("unexpected error in POST /v1/audio/speech")
            error = SynthesisError("internal_error", "internal error; see the server log")
            return self._openai_error_response(error)
        return Response(result.audio, media_type=CONTENT_TYPES[result.format])

    async def _streaming_response(
        self, speech: SpeechRequest, synthesis: SynthesisRequest, accepted_at: float
    ) -> StreamingResponse:
        """Waits for the first piece, so that a refusal is still an HTTP error; then streams."""
        pieces = self._stream(synthesis, accepted_at)
        try:
            first = await anext(pieces)
        except BaseException:
            await pieces.aclose()
            raise
        sse = speech.stream_format == "sse"

        async def body() -> AsyncIterator[bytes]:
            header = streaming_wav_header(first.sample_rate) if speech.response_format == "wav" else b""
            first_audio_s = time.monotonic() - accepted_at
            piece, num_samples = first, 0
            try:
                while True:
                    audio = header + piece.audio
                    header = b""
                    yield audio_delta_event(audio) if sse else audio
                    num_samples += piece.num_samples
                    piece = await anext(pieces, None)
                    if piece is None:
                        break
            except SynthesisError as error:
                record_refusal(error.code, error.status)
                if not sse:
                    raise  # the connection is dropped mid-body: the client sees a broken stream
                yield sse_event({"type": "error", **openai_error(error)[0].model_dump()})
                return
            finally:
                await pieces.aclose()
            if sse:
                yield sse_event(
                    {
                        "type": "speech.audio.done",
                        "usage": {
                            "input_characters": len(synthesis.text),
                            "output_audio_seconds": num_samples / first.sample_rate,
                        },
                        "timings": {
                            "time_to_first_audio_s": first_audio_s,
                            "total_s": time.monotonic() - accepted_at,
                        },
                    }
                )

        media_type = stream_content_type(synthesis.format, speech.stream_format)
        return StreamingResponse(body(), media_type=media_type)

    def _openai_error_response(self, error: SynthesisError) -> JSONResponse:
        field = _OPENAI_FIELDS.get(error.field, error.field)
        return self._with_retry_after(openai_error_response(SynthesisError(error.code, error.message, field)))

    def _with_retry_after(self, response: JSONResponse) -> JSONResponse:
        """A refusal for now, not for good (429, 503) says when to come back."""
        if response.status_code in (429, 503):
            response.headers["Retry-After"] = str(self._limits.retry_after_s)
        return response

    async def synthesize(self, request: SynthesisRequest) -> SynthesisResult:
        """The handle API. Raises SynthesisError for a request it refuses or cannot serve."""
        with _counting_refusals():
            return await self._serve(request, time.monotonic())

    async def _serve(self, request: SynthesisRequest, accepted_at: float) -> SynthesisResult:
        with self._admitted():
            return await self._synthesize(request, accepted_at)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Holds one of `limits.max_active_requests` slots; without a free one, refuses at once: waiting
        behind that many requests would take longer than a client should wait."""
        limit = self._limits.max_active_requests
        if limit is not None and self._active_requests >= limit:
            raise SynthesisError(
                "overloaded", f"the service is busy ({limit} requests in progress); retry later"
            )
        self._active_requests += 1
        try:
            yield
        finally:
            self._active_requests -= 1

    async def _synthesize(self, request: SynthesisRequest, accepted_at: float) -> SynthesisResult:
        jobs, plan = await self._prepare(request)
        try:
            chunk_audio = await self._synthesize_chunks(jobs, accepted_at)
            return await self._stitcher.stitch.remote(plan, *chunk_audio)
        except Exception as error:
            raise model_error(error) from None

    async def synthesize_stream(self, request: SynthesisRequest) -> AsyncIterator[AudioPiece]:
        """The streaming handle API: `handle.options(stream=True).synthesize_stream.remote(request)`
        yields AudioPiece (s16le) in order, each as soon as its chunks are ready. Raises
        SynthesisError for a request it refuses or cannot serve."""
        with _counting_refusals():
            async for piece in self._stream(request, time.monotonic()):
                yield piece

    async def _stream(self, request: SynthesisRequest, accepted_at: float) -> AsyncIterator[AudioPiece]:
        """The request's audio in pieces, in order, joined (crossfade and pause) as in the whole
        response (`_joined_audio`); a piece leaves once it has MIN_PIECE_SECONDS of final samples
        (or is the last), watermarked on its own by the stitcher."""
        with self._admitted():
            jobs, plan = await self._prepare(request)
            min_piece = MIN_PIECE_SECONDS * plan.sample_rate
            pending: list[np.ndarray] = []
            start = 0
            try:
                async with contextlib.aclosing(self._joined_audio(jobs, plan, accepted_at)) as joined:
                    async for final, done in joined:
                        pending.append(final)
                        samples = np.concatenate(pending)
                        if len(samples) < min_piece and done < len(jobs):
                            continue
                        pending = []
                        audio = await self._stitcher.encode_piece.remote(samples, plan.sample_rate)
                        yield AudioPiece(
                            audio=audio,
                            sample_rate=plan.sample_rate,
                            start_sample=start,
                            num_samples=len(samples),
                            chunks_done=done,
                            chunks_total=len(jobs),
                        )
                        start += len(samples)
            except Exception as error:
                raise model_error(error) from None

    async def _joined_audio(
        self, jobs: list[ChunkJob], plan: StitchPlan, accepted_at: float
    ) -> AsyncIterator[tuple[np.ndarray, int]]:
        """(joined samples that no later chunk can change, chunks done) as they become final.

        The first chunk streams token by token (`TurboModel.stream_chunk`): its pieces pass on as
        they come, less the tail a next chunk's crossfade still changes. Meanwhile the later chunks
        are synthesised whole (`finished_in_order`) and joined in order once the first has ended.
        """
        joiner = StreamingStitch(plan.pauses, plan.crossfade)
        first = self._model.options(stream=True).stream_chunk.remote(jobs[0])
        later = finished_in_order(self._model, jobs[1:], max(1, self._max_chunks_in_flight - 1), None)
        next_later = asyncio.ensure_future(anext(later, None))  # sends the later chunks' calls now
        # What `joiner.add` holds back of the first chunk (at least one sample, so the chunk's end
        # always comes with a piece that says it is done).
        held = max(1, plan.crossfade if len(jobs) > 1 else 0)
        granule = round(PIECE_GRANULE_SECONDS * plan.sample_rate)
        try:
            parts: list[np.ndarray] = []
            sent = 0
            async for part in first:
                if not parts:
                    record_time_to_first_audio(time.monotonic() - accepted_at)
                parts.append(part)
                final = (sum(len(p) for p in parts) - held) // granule * granule
                if final > sent:
                    yield np.concatenate(parts)[sent:final], 0
                    sent = final
            # The first chunk is not faded in, so `add` returns the samples passed on unchanged.
            yield joiner.add(np.concatenate(parts))[sent:], 1
            done = 1
            while (item := await next_later) is not None:
                call, _ = item
                done += 1
                yield joiner.add(call.result()), done
                next_later = asyncio.ensure_future(anext(later, None))
        finally:
            first.cancel()
            next_later.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its error was raised above
                await next_later
            await later.aclose()  # cancels the later chunks' calls still running

    async def _prepare(self, request: SynthesisRequest) -> tuple[list[ChunkJob], StitchPlan]:
        """Check the request and make its chunk jobs (the built-in or its decoded voice) and stitch plan."""
        check_text(request.text)
        if len(request.text) > self._limits.max_text_chars:
            raise SynthesisError(
                "text_too_long",
                f"text has {len(request.text)} characters; the limit is {self._limits.max_text_chars}",
                "text",
            )
        info = await self._get_model_info()
        chunks = split_text(request.text, self._chunking.max_chunk_chars, info.max_text_tokens)
        if not chunks:
            raise SynthesisError("empty_text", "text is empty", "text")
        try:
            sampling = request.sampling(self._max_new_tokens)
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
        return jobs, stitch_plan(chunks, self._stitching, info.sample_rate, request.format)

    async def _synthesize_chunks(self, jobs: list[ChunkJob], accepted_at: float) -> list[DeploymentResponse]:
        """The finished model calls of `jobs`, in order (see `finished_in_order`)."""
        calls = finished_in_order(self._model, jobs, self._max_chunks_in_flight, accepted_at)
        return [response async for _, response in calls]

    async def _get_model_info(self) -> ModelInfo:
        if self._model_info is None:
            self._model_info = await self._model.info.remote()
        return self._model_info

    async def _parse_http_request(self, request: Request) -> SynthesisRequest:
        try:
            http_request = TTSHttpRequest.model_validate(await self._read_json(request))
        except ValidationError as error:
            raise validation_error(error) from None
        reference = None
        if http_request.reference_audio_base64 is not None:
            try:
                reference = base64.b64decode(http_request.reference_audio_base64, validate=True)
            except ValueError as error:  # binascii.Error, or characters outside ASCII
                raise SynthesisError(
                    "invalid_base64",
                    f"reference_audio_base64 is not valid base64: {error}",
                    "reference_audio_base64",
                ) from None
        params = http_request.model_dump(exclude={"reference_audio_base64"})
        return SynthesisRequest(**params, reference_audio=reference)

    async def _read_json(self, request: Request) -> Any:
        """The JSON body, refused unless it is JSON of at most `limits.max_request_bytes`."""
        return await read_json(request, self._limits.max_request_bytes)

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
        limit = self._limits.max_reference_bytes
        if len(reference_audio) > limit:
            raise SynthesisError(
                "reference_too_large", f"reference audio exceeds {limit} bytes", "reference_audio"
            )
        try:
            reference = await asyncio.to_thread(
                decode_reference_audio, reference_audio, self._limits.max_reference_seconds
            )
        except TTSInputError as error:
            raise input_error(error) from None
        return SharedReference(reference_id=reference.id, audio=ray.put(reference))
