"""One durable job's run, in a `Jobs` consumer replica, over the model and stitcher handles: the
request prepared as `/v1/tts` prepares it, its chunks fanned out (at most `max_in_flight` at once)
and each checkpointed in the store as it finishes, then stitched (watermark, encoding) and stored,
then delivered (upload, webhook).

A run holds the job's lease in the store and renews it every third of `lease_s`: a second delivery
of the same job (Celery redelivers a task whose consumer died, or one unacknowledged for longer than
its visibility timeout) waits while the lease is live, then resumes from the checkpointed chunks.
Since chunk i's seed is the job's seed + i and checkpoints keep the exact float32 samples, a resumed
job with a seed gives the same bytes as an uninterrupted one. A lease that cannot be renewed (the
job was cancelled) cancels the run, and its chunk calls with it. A finished job keeps its lease
until it is delivered: a run that dies in between leaves the delivery to the next one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import numpy as np
from ray.serve.handle import DeploymentHandle

from serve_app.errors import SynthesisError, model_error
from serve_app.jobs.config import JobsConfig
from serve_app.jobs.delivery import post_status, put_audio
from serve_app.jobs.records import JobError, JobRecord, JobView
from serve_app.jobs.runpod import runpod_status
from serve_app.jobs.store import JobStore
from serve_app.schemas import ChunkJob, SynthesisRequest, SynthesisResult
from serve_app.synthesis.audio import CONTENT_TYPES
from serve_app.synthesis.fanout import finished_in_order
from serve_app.synthesis.prepare import Preparer

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class JobRunner:
    def __init__(
        self,
        model: DeploymentHandle,
        stitcher: DeploymentHandle,
        preparer: Preparer,
        store: JobStore,
        config: JobsConfig,
        max_in_flight: int,
    ) -> None:
        self._model = model
        self._stitcher = stitcher
        self._preparer = preparer
        self._store = store
        self._config = config
        self._max_in_flight = max_in_flight

    async def run(self, job_id: str) -> str:
        """Run (or resume, or wait for) the job, then deliver what it asked for; its status once this
        delivery of the task is done with it."""
        owner = uuid.uuid4().hex
        while (
            answer := await asyncio.to_thread(self._store.acquire_lease, job_id, owner, self._config.lease_s)
        ) == "held":
            await asyncio.sleep(self._config.lease_s / 3)  # another run's lease is live: wait for it
        record = None
        if answer == "acquired":
            record = await self._holding_lease(job_id, owner, self._run(job_id, owner))
        elif answer == "deliver":  # an earlier run finished the job and died before delivering
            record = await asyncio.to_thread(self._store.get, job_id)
        if record is not None and record.delivery_pending:
            await self._holding_lease(job_id, owner, asyncio.to_thread(self._deliver, record, owner))
        record = await asyncio.to_thread(self._store.get, job_id)
        return "expired" if record is None else record.status

    async def _holding_lease(self, job_id: str, owner: str, work: Awaitable[T]) -> T | None:
        """Await `work` while renewing `owner`'s lease every third of `lease_s`; a lease that cannot
        be renewed (the job was cancelled, or another run took over after a stall) cancels it."""
        task = asyncio.ensure_future(work)
        while not task.done():
            await asyncio.wait({task}, timeout=self._config.lease_s / 3)
            if not task.done() and not await asyncio.to_thread(
                self._store.renew_lease, job_id, owner, self._config.lease_s
            ):
                task.cancel()  # store nothing more
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return None

    async def _run(self, job_id: str, owner: str) -> JobRecord | None:
        fields, reference = await asyncio.to_thread(self._store.request, job_id)
        try:
            jobs, plan = await self._preparer.prepare(SynthesisRequest(**fields, reference_audio=reference))
            audio = await self._all_chunks(job_id, owner, jobs, plan.sample_rate)
            result: SynthesisResult = await self._stitcher.stitch.remote(plan, *audio)
        except SynthesisError as error:
            return await self._fail(job_id, owner, error)
        except Exception as error:  # a chunk or the stitch failed past its retries
            return await self._fail(job_id, owner, model_error(error))
        chunks = json.dumps([chunk.model_dump() for chunk in result.chunks]).encode()
        return await asyncio.to_thread(
            self._store.finish,
            job_id,
            owner,
            lambda r: r.model_copy(
                update={
                    "status": "completed",
                    "sample_rate": result.sample_rate,
                    "duration_s": result.duration_s,
                }
            ),
            {"audio": result.audio, "result.json": chunks},
        )

    async def _all_chunks(
        self, job_id: str, owner: str, jobs: list[ChunkJob], sample_rate: int
    ) -> list[np.ndarray]:
        """Every chunk's audio: the checkpointed ones, the rest synthesised and checkpointed. A failed
        chunk is retried (`chunk_retries`, doubling delays); an input error at once is final."""
        done = await asyncio.to_thread(self._store.resume, job_id, owner, sample_rate)
        for attempt in range(self._config.chunk_retries + 1):
            missing = [i for i in range(len(jobs)) if i not in done]
            try:
                async for index, audio in self._synthesize(jobs, missing):
                    await asyncio.to_thread(self._store.save_chunk, job_id, index, audio, sample_rate, owner)
                    done[index] = audio
                break
            except Exception as error:
                failure = model_error(error)
                if failure.status < 500 or attempt == self._config.chunk_retries:
                    raise failure from None
                logger.warning("job %s: a chunk failed (%s); retry %d", job_id, failure.code, attempt + 1)
                await asyncio.sleep(self._config.chunk_retry_delay_s * 2**attempt)
        return [done[i] for i in range(len(jobs))]

    async def _synthesize(
        self, jobs: list[ChunkJob], indices: list[int]
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        calls = finished_in_order(self._model, [jobs[i] for i in indices], self._max_in_flight, None)
        async with contextlib.aclosing(calls):  # closing it cancels the calls still running
            position = 0
            async for call, _ in calls:
                yield indices[position], call.result()
                position += 1

    async def _fail(self, job_id: str, owner: str, error: SynthesisError) -> JobRecord | None:
        logger.warning("job %s failed: %s", job_id, error)
        failed = JobError(code=error.code, message=error.message, field=error.field)
        return await asyncio.to_thread(
            self._store.finish,
            job_id,
            owner,
            lambda r: r.model_copy(update={"status": "failed", "error": failed}),
            {},
        )

    def _deliver(self, record: JobRecord, owner: str) -> None:
        """Upload the audio and call the webhook, as the job asked; the outcome goes in its record."""
        config = self._config
        delivery = record.delivery.model_copy()
        try:
            if record.output_url is not None and record.status == "completed":
                audio = self._store.audio_path(record.id).read_bytes()
                put_audio(
                    record.output_url,
                    audio,
                    CONTENT_TYPES[record.format],
                    config.delivery_attempts,
                    config.delivery_timeout_s,
                )
                delivery.output_uploaded = True
        except Exception as error:
            delivery.output_uploaded, delivery.error = False, f"output_url: {error}"
        try:
            if record.webhook is not None:
                post_status(
                    record.webhook,
                    self._webhook_body(record.model_copy(update={"delivery": delivery})),
                    config.delivery_attempts,
                    config.delivery_timeout_s,
                )
                delivery.webhook_delivered = True
        except Exception as error:
            delivery.webhook_delivered, delivery.error = False, f"webhook: {error}"
        self._store.delivered(record.id, owner, delivery)

    def _webhook_body(self, record: JobRecord) -> dict:
        if record.webhook_shape == "runpod":
            return runpod_status(record, self._store).model_dump(exclude_none=True)
        return JobView.of(record, time.time()).model_dump()
