"""RunPod serverless shapes of a job, for the RunPod-compatible door (`serve_app.api.runpod`) and
the webhooks of the jobs it submitted. Source of the shapes: RunPod's operation reference for
queue-based endpoints, https://docs.runpod.io/serverless/endpoints/operation-reference (`/run`,
`/runsync`, `/status/{id}`, `/cancel/{id}`, `/health`; `delayTime` and `executionTime` in ms)."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel

from serve_app.jobs.records import JobRecord, JobStatus
from serve_app.jobs.store import JobStore

RunPodStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]
RUNPOD_STATUS: dict[JobStatus, RunPodStatus] = {
    "queued": "IN_QUEUE",
    "running": "IN_PROGRESS",
    "completed": "COMPLETED",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
}


class RunPodJob(BaseModel):
    id: str
    status: RunPodStatus
    delayTime: int | None = None  # ms in the queue  # noqa: N815 (RunPod's names)
    executionTime: int | None = None  # ms running  # noqa: N815
    # A completed job: the seed handler's output, the audio in base64 (the job's format, WAV by default).
    output: dict[str, Any] | None = None
    error: str | None = None


def runpod_status(record: JobRecord, store: JobStore) -> RunPodJob:
    """The job as RunPod's `/status/{id}` states it (the audio read from the store when completed)."""
    delay = execution = None
    if record.started_at is not None:
        delay = round((record.started_at - record.created_at) * 1000)
        if record.finished_at is not None:
            execution = round((record.finished_at - record.started_at) * 1000)
    output = None
    if record.status == "completed":
        output = {
            "audio_base64": base64.b64encode(store.audio_path(record.id).read_bytes()).decode("ascii"),
            "sample_rate": record.sample_rate,
            "duration_s": record.duration_s,
            "format": record.format,
        }
    return RunPodJob(
        id=record.id,
        status=RUNPOD_STATUS[record.status],
        delayTime=delay,
        executionTime=execution,
        output=output,
        error=None if record.error is None else f"[{record.error.code}] {record.error.message}",
    )
