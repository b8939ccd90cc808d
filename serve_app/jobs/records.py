"""A job's record: its status, progress, timings, lease and delivery, as the store keeps it."""

from __future__ import annotations

import re
import secrets
from typing import Literal

from pydantic import BaseModel

from serve_app.synthesis.audio import AudioFormat

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def new_job_id() -> str:
    """128 random bits: a job id is its only credential beside the API key."""
    return secrets.token_hex(16)


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None


class Delivery(BaseModel):
    """Where a job's result went: the PUT of its audio to `output_url`, the POST of its status to
    `webhook` (None: not asked for, or not yet tried)."""

    output_uploaded: bool | None = None
    webhook_delivered: bool | None = None
    error: str | None = None


class JobRecord(BaseModel):
    id: str
    status: JobStatus = "queued"
    format: AudioFormat
    chunks_total: int
    chunks_done: int = 0
    audio_seconds: float = 0.0  # of the finished chunks, before stitching
    created_at: float  # wall clock (time.time())
    started_at: float | None = None  # first run
    first_progress_at: float | None = None  # first chunk finished
    finished_at: float | None = None
    runs: int = 0  # runs started: more than one after a redelivery
    sample_rate: int | None = None
    duration_s: float | None = None  # of the stitched audio, once completed
    error: JobError | None = None
    output_url: str | None = None
    webhook: str | None = None
    webhook_shape: Literal["jobs", "runpod"] = "jobs"  # the door it came through: the body it gets
    delivery: Delivery = Delivery()
    lease_owner: str | None = None  # the run that may write this job's chunks and result
    lease_expires: float | None = None  # wall clock

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def delivery_pending(self) -> bool:
        """Finished, and an upload or webhook it asked for has not been tried yet."""
        if self.status not in ("completed", "failed"):
            return False
        upload = (
            self.output_url is not None
            and self.status == "completed"
            and self.delivery.output_uploaded is None
        )
        return upload or (self.webhook is not None and self.delivery.webhook_delivered is None)

    def lease_live(self, now: float) -> bool:
        return self.lease_owner is not None and self.lease_expires is not None and self.lease_expires > now


class JobProgress(BaseModel):
    chunks_done: int
    chunks_total: int
    audio_seconds: float


class JobTimings(BaseModel):
    queued_s: float | None  # submit -> first run
    time_to_first_progress_s: float | None  # submit -> first chunk finished
    running_s: float | None  # first run -> finished (or now)
    total_s: float  # submit -> finished (or now)


class JobView(BaseModel):
    """What `GET /v1/jobs/{id}` answers (and a webhook receives)."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    format: AudioFormat
    created_at: float
    finished_at: float | None
    progress: JobProgress
    timings: JobTimings
    sample_rate: int | None
    duration_s: float | None
    error: JobError | None
    delivery: Delivery

    @classmethod
    def of(cls, record: JobRecord, now: float) -> JobView:
        end = record.finished_at or now

        def since(moment: float | None) -> float | None:
            return None if moment is None else moment - record.created_at

        return cls(
            id=record.id,
            status=record.status,
            format=record.format,
            created_at=record.created_at,
            finished_at=record.finished_at,
            progress=JobProgress(
                chunks_done=record.chunks_done,
                chunks_total=record.chunks_total,
                audio_seconds=record.audio_seconds,
            ),
            timings=JobTimings(
                queued_s=since(record.started_at),
                time_to_first_progress_s=since(record.first_progress_at),
                running_s=None if record.started_at is None else end - record.started_at,
                total_s=end - record.created_at,
            ),
            sample_rate=record.sample_rate,
            duration_s=record.duration_s,
            error=record.error,
            delivery=record.delivery,
        )
