"""Durable jobs over HTTP: `POST /v1/jobs` (the `/v1/tts` fields, a longer text, and where to deliver
the result) -> 202 `{id, status}`; `GET /v1/jobs/{job_id}` (status, progress, timings);
`GET /v1/jobs/{job_id}/audio` (the file, with Range requests); `GET /v1/jobs/{job_id}/captions`;
`DELETE /v1/jobs/{job_id}` (cancel). Errors are in our shape.

No `from __future__ import annotations` (see `serve_app.api.tts`).
"""

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, get_args

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from serve_app.api.errors import ErrorResponse, error_response, renamed, unexpected_error
from serve_app.api.http_body import json_body, parse_json
from serve_app.api.tts import TTSHttpFields, synthesis_request
from serve_app.config import LimitsConfig
from serve_app.errors import SynthesisError
from serve_app.jobs.frontend import JobsFrontend
from serve_app.jobs.records import JobView
from serve_app.synthesis.audio import CONTENT_TYPES
from serve_app.synthesis.captions import CAPTION_MEDIA_TYPES, CaptionFormat, captions

router = APIRouter()
JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse},
    "5XX": {"model": ErrorResponse},
}
_HTTP_FIELDS = {"reference_audio": "reference_audio_base64"}
URL_SCHEMA = {"format": "uri", "maxLength": 4096}


class JobHttpRequest(TTSHttpFields):
    """Body of `POST /v1/jobs`: the `/v1/tts` fields (text up to `jobs.max_text_chars`) and where to
    deliver the result (hosts in `jobs.allowed_hosts` only)."""

    output_url: str | None = Field(None, json_schema_extra=URL_SCHEMA)  # PUT of the audio file
    webhook: str | None = Field(None, json_schema_extra=URL_SCHEMA)  # POST of the final status


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"


async def answered(
    work: Callable[[JobsFrontend], Awaitable[Response]],
    jobs: JobsFrontend | None,
    limits: LimitsConfig,
    what: str,
) -> Response:
    """`work`'s response over the jobs front end, or its refusal in our shape."""
    try:
        if jobs is None:
            raise SynthesisError("not_found", "jobs are not enabled on this deployment (jobs.enabled)")
        return await work(jobs)
    except SynthesisError as error:
        return error_response(renamed(error, _HTTP_FIELDS), limits.retry_after_s)
    except Exception:
        return error_response(unexpected_error(what), limits.retry_after_s)


class JobsRoutes:
    """The routes; the ingress that inherits them sets these attributes."""

    _jobs: JobsFrontend | None
    _limits: LimitsConfig

    @router.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses=JOB_ERRORS,
        openapi_extra=json_body(JobHttpRequest),
    )
    async def submit_job(self, request: Request) -> Response:
        async def submit(jobs: JobsFrontend) -> Response:
            body = await parse_json(request, JobHttpRequest, self._limits.max_request_bytes)
            synthesis = synthesis_request(body, frozenset({"output_url", "webhook"}))
            record = await jobs.submit(synthesis, body.output_url, body.webhook)
            return JSONResponse(JobAccepted(id=record.id).model_dump(), status_code=202)

        return await answered(submit, self._jobs, self._limits, "POST /v1/jobs")

    @router.get("/v1/jobs/{job_id}", response_model=JobView, responses=JOB_ERRORS)
    async def get_job(self, job_id: str) -> Response:
        async def get(jobs: JobsFrontend) -> Response:
            record = await jobs.get(job_id)
            return JSONResponse(JobView.of(record, time.time()).model_dump())

        return await answered(get, self._jobs, self._limits, "GET /v1/jobs/{job_id}")

    @router.delete("/v1/jobs/{job_id}", response_model=JobView, responses=JOB_ERRORS)
    async def cancel_job(self, job_id: str) -> Response:
        async def cancel(jobs: JobsFrontend) -> Response:
            record = await jobs.cancel(job_id)
            return JSONResponse(JobView.of(record, time.time()).model_dump())

        return await answered(cancel, self._jobs, self._limits, "DELETE /v1/jobs/{job_id}")

    @router.get(
        "/v1/jobs/{job_id}/audio",
        response_class=FileResponse,
        responses={**JOB_ERRORS, 200: {"content": {t: {} for t in CONTENT_TYPES.values()}}},
    )
    async def job_audio(self, job_id: str) -> Response:
        """The completed job's audio file; Range requests (RFC 9110) get 206 with that part."""

        async def audio(jobs: JobsFrontend) -> Response:
            record, path = await jobs.audio(job_id)
            filename = f"{job_id}.{record.format}"
            return FileResponse(path, media_type=CONTENT_TYPES[record.format], filename=filename)

        return await answered(audio, self._jobs, self._limits, "GET /v1/jobs/{job_id}/audio")

    @router.get(
        "/v1/jobs/{job_id}/captions",
        responses={**JOB_ERRORS, 200: {"content": {t: {} for t in CAPTION_MEDIA_TYPES.values()}}},
    )
    async def job_captions(
        self,
        job_id: str,
        format: str = Query("srt", json_schema_extra={"enum": list(get_args(CaptionFormat))}),
    ) -> Response:
        """The completed job's captions: SRT, WebVTT, or JSON segments (`serve_app.synthesis.captions`)."""

        async def read(jobs: JobsFrontend) -> Response:
            if format not in get_args(CaptionFormat):
                raise SynthesisError(
                    "invalid_parameter", f"format: one of {get_args(CaptionFormat)}", "format"
                )
            record, chunks = await jobs.result_chunks(job_id)
            text = captions(chunks, record.sample_rate, format)
            if format == "json":
                return JSONResponse(text)
            return Response(text, media_type=CAPTION_MEDIA_TYPES[format])

        return await answered(read, self._jobs, self._limits, "GET /v1/jobs/{job_id}/captions")
