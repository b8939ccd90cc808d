"""Submit, look up and cancel jobs: what both HTTP doors (`/v1/jobs`, the RunPod-compatible
`/v2/...`) do, in an ingress replica. The request is checked exactly as `/v1/tts` checks it (the
same `Preparer`, with the jobs' text limit) before anything is stored or queued."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from ray.serve.task_processor import CeleryTaskProcessorAdapter

from serve_app.errors import SynthesisError
from serve_app.jobs.broker import enqueue_job
from serve_app.jobs.config import JobsConfig
from serve_app.jobs.delivery import check_target
from serve_app.jobs.records import JobRecord, new_job_id
from serve_app.jobs.store import JobStore
from serve_app.schemas import ChunkInfo, SynthesisRequest
from serve_app.synthesis.prepare import Preparer

# The fields a job keeps of its request (`request.json`); the clip is a file of its own.
REQUEST_FILE_EXCLUDE = {"reference_audio"}


class JobsFrontend:
    def __init__(
        self,
        config: JobsConfig,
        preparer: Preparer,
        store: JobStore,
        producer: CeleryTaskProcessorAdapter,
    ) -> None:
        self.config = config
        self.store = store
        self._preparer = preparer
        self._producer = producer

    async def submit(
        self,
        request: SynthesisRequest,
        output_url: str | None = None,
        webhook: str | None = None,
        webhook_shape: Literal["jobs", "runpod"] = "jobs",
    ) -> JobRecord:
        """Check, store and queue a job; refuses (SynthesisError) what `/v1/tts` would, a target
        host not allowed, or a full queue."""
        check_target(output_url, self.config.allowed_hosts, "output_url")
        check_target(webhook, self.config.allowed_hosts, "webhook")
        chunk_jobs, _ = await self._preparer.prepare(request)
        await asyncio.to_thread(self.store.sweep)  # expired jobs leave the queue count and the disk
        if (await asyncio.to_thread(self.store.counts))["queued"] >= self.config.max_queued:
            raise SynthesisError(
                "queue_full", f"{self.config.max_queued} jobs are already queued; retry later"
            )
        record = JobRecord(
            id=new_job_id(),
            format=request.format,
            chunks_total=len(chunk_jobs),
            created_at=time.time(),
            output_url=output_url,
            webhook=webhook,
            webhook_shape=webhook_shape,
        )
        fields = request.model_dump(mode="json", exclude=REQUEST_FILE_EXCLUDE)
        await asyncio.to_thread(self.store.create, record, fields, request.reference_audio)
        await asyncio.to_thread(enqueue_job, self._producer, record.id)
        return record

    async def get(self, job_id: str) -> JobRecord:
        record = await asyncio.to_thread(self.store.get, job_id)
        if record is None:
            raise SynthesisError("job_not_found", f"no job {job_id!r} (unknown, or expired)", "job_id")
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job: its run stops at its next lease check (its chunk calls are
        cancelled) and stores nothing more. A finished job is refused (409)."""
        await self.get(job_id)
        finished = False

        def cancel(record: JobRecord) -> JobRecord | None:
            nonlocal finished
            if record.finished:
                finished = True
                return None
            return record.model_copy(
                update={"status": "cancelled", "finished_at": time.time(), "lease_owner": None}
            )

        record = await asyncio.to_thread(self.store.update, job_id, cancel)
        if record is None:
            raise SynthesisError("job_not_found", f"no job {job_id!r} (unknown, or expired)", "job_id")
        if finished:
            raise SynthesisError("job_finished", f"job {job_id} is already {record.status}", "job_id")
        return record

    async def completed(self, job_id: str) -> JobRecord:
        """A completed job's record (409 until it is completed)."""
        record = await self.get(job_id)
        if record.status != "completed":
            raise SynthesisError("job_not_completed", f"job {job_id} is {record.status}", "job_id")
        return record

    async def audio(self, job_id: str) -> tuple[JobRecord, str]:
        """A completed job's record and the path of its audio file."""
        record = await self.completed(job_id)
        return record, str(self.store.audio_path(job_id))

    async def result_chunks(self, job_id: str) -> tuple[JobRecord, list[ChunkInfo]]:
        """A completed job's record and where each chunk sits in its audio."""
        record = await self.completed(job_id)
        return record, await asyncio.to_thread(self.store.result_chunks, job_id)
