"""A RunPod-compatible door to durable jobs, so a client written for a RunPod serverless endpoint
switches by base URL: `POST /v2/{endpoint_id}/run`, `POST /v2/{endpoint_id}/runsync`,
`GET /v2/{endpoint_id}/status/{job_id}`, `POST /v2/{endpoint_id}/cancel/{job_id}`,
`GET /v2/{endpoint_id}/health`, in RunPod's body shapes (`serve_app.jobs.runpod` names the source).
`endpoint_id` is accepted and ignored: this service is one endpoint. The job's `input` is the seed
handler's (`text`, `reference_audio_base64`) with the `/v1/tts` fields; a completed job's `output`
holds the audio in base64 (WAV unless `format` says otherwise). Errors are in our shape.

No `from __future__ import annotations` (see `serve_app.api.tts`).
"""

import asyncio
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.schema import ReplicaState

from serve_app.api.http_body import json_body, parse_json
from serve_app.api.jobs import JOB_ERRORS, URL_SCHEMA, answered
from serve_app.api.tts import TTSHttpFields, synthesis_request
from serve_app.config import LimitsConfig
from serve_app.errors import SynthesisError
from serve_app.jobs.config import CONSUMER_DEPLOYMENT
from serve_app.jobs.frontend import JobsFrontend
from serve_app.jobs.records import FINISHED
from serve_app.jobs.runpod import RunPodJob, runpod_status

router = APIRouter()
_POLL_S = 0.25  # how often runsync looks at its job


def _wait_s(wait: str) -> float:
    """RunPod's `?wait=` of `/runsync`: milliseconds, 1000 to 300000."""
    if not wait.isdigit() or not 1000 <= int(wait) <= 300_000:
        raise SynthesisError("invalid_parameter", "wait: milliseconds from 1000 to 300000", "wait")
    return int(wait) / 1000


class RunPodRequest(BaseModel):
    """Body of `/run` and `/runsync`."""

    model_config = ConfigDict(extra="forbid")

    input: TTSHttpFields
    webhook: str | None = Field(None, json_schema_extra=URL_SCHEMA)  # POST of the final status


def consumer_replicas(app_name: str) -> int:
    """Running replicas of the jobs consumer deployment, as Serve's controller reports them."""
    deployment = serve.status().applications[app_name].deployments.get(CONSUMER_DEPLOYMENT)
    return 0 if deployment is None else deployment.replica_states.get(ReplicaState.RUNNING, 0)


class RunPodHealth(BaseModel):
    jobs: dict[str, int]  # completed, failed, inProgress, inQueue, retried
    workers: dict[str, int]  # idle, running


class RunPodRoutes:
    """The routes (over the same jobs as `/v1/jobs`); the ingress that inherits them sets these."""

    _jobs: JobsFrontend | None
    _limits: LimitsConfig
    _app_name: str

    async def _submit(self, jobs: JobsFrontend, request: Request) -> RunPodJob:
        body = await parse_json(request, RunPodRequest, self._limits.max_request_bytes)
        record = await jobs.submit(synthesis_request(body.input), None, body.webhook, "runpod")
        return runpod_status(record, jobs.store)

    @router.post(
        "/v2/{endpoint_id}/run",
        response_model=RunPodJob,
        responses=JOB_ERRORS,
        openapi_extra=json_body(RunPodRequest),
    )
    async def runpod_run(self, endpoint_id: str, request: Request) -> Response:
        async def run(jobs: JobsFrontend) -> Response:
            return JSONResponse((await self._submit(jobs, request)).model_dump(exclude_none=True))

        return await answered(run, self._jobs, self._limits, "POST /v2/{endpoint_id}/run")

    @router.post(
        "/v2/{endpoint_id}/runsync",
        response_model=RunPodJob,
        responses=JOB_ERRORS,
        openapi_extra=json_body(RunPodRequest),
    )
    async def runpod_runsync(
        self,
        endpoint_id: str,
        request: Request,
        wait: str | None = Query(
            None, json_schema_extra={"type": "integer", "minimum": 1000, "maximum": 300_000}
        ),
    ) -> Response:
        """Submit and wait up to `wait` ms (`jobs.config.runsync_wait_s` by default) for the result; a job
        still running by then answers its id and status, to poll with `/status`."""

        async def runsync(jobs: JobsFrontend) -> Response:
            wait_s = jobs.config.runsync_wait_s if wait is None else _wait_s(wait)
            job = await self._submit(jobs, request)
            deadline = time.monotonic() + wait_s
            record = await jobs.get(job.id)
            while record.status not in FINISHED and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)
                record = await jobs.get(job.id)
            status = await asyncio.to_thread(runpod_status, record, jobs.store)
            return JSONResponse(status.model_dump(exclude_none=True))

        return await answered(runsync, self._jobs, self._limits, "POST /v2/{endpoint_id}/runsync")

    @router.get("/v2/{endpoint_id}/status/{job_id}", response_model=RunPodJob, responses=JOB_ERRORS)
    async def runpod_job_status(self, endpoint_id: str, job_id: str) -> Response:
        async def status(jobs: JobsFrontend) -> Response:
            record = await jobs.get(job_id)
            job = await asyncio.to_thread(runpod_status, record, jobs.store)
            return JSONResponse(job.model_dump(exclude_none=True))

        return await answered(status, self._jobs, self._limits, "GET /v2/{endpoint_id}/status/{job_id}")

    @router.post("/v2/{endpoint_id}/cancel/{job_id}", response_model=RunPodJob, responses=JOB_ERRORS)
    async def runpod_cancel(self, endpoint_id: str, job_id: str) -> Response:
        async def cancel(jobs: JobsFrontend) -> Response:
            record = await jobs.cancel(job_id)
            return JSONResponse(runpod_status(record, jobs.store).model_dump(exclude_none=True))

        return await answered(cancel, self._jobs, self._limits, "POST /v2/{endpoint_id}/cancel/{job_id}")

    @router.get("/v2/{endpoint_id}/health", response_model=RunPodHealth, responses=JOB_ERRORS)
    async def runpod_health(self, endpoint_id: str) -> Response:
        async def health(jobs: JobsFrontend) -> Response:
            counts = await asyncio.to_thread(jobs.store.counts)
            replicas = await asyncio.to_thread(consumer_replicas, self._app_name)
            in_progress = min(counts["running"], replicas)
            return JSONResponse(
                RunPodHealth(
                    jobs={
                        "completed": counts["completed"],
                        "failed": counts["failed"],
                        "inProgress": counts["running"],
                        "inQueue": counts["queued"],
                        "retried": counts["retried"],
                    },
                    workers={"idle": replicas - in_progress, "running": in_progress},
                ).model_dump()
            )

        return await answered(health, self._jobs, self._limits, "GET /v2/{endpoint_id}/health")
