"""Jobs on a directory that every ingress and consumer replica mounts:

    <dir>/jobs/<id>/record.json      JobRecord (status, progress, lease); replaced atomically
    <dir>/jobs/<id>/request.json     the job's synthesis fields, written once
    <dir>/jobs/<id>/reference        its reference clip, if it sent one
    <dir>/jobs/<id>/chunks/<i>.npy   chunk i's audio (float32), checkpointed as it finishes
    <dir>/jobs/<id>/audio            the stitched, encoded result
    <dir>/jobs/<id>/result.json      where each chunk sits in it (captions come from this)
    <dir>/jobs/<id>/.lock            serialises changes of the record (flock)

Every change of a record happens under its lock, so a lease decides who writes a job's chunks: a
chunk or result of a run that no longer holds the lease (its job was cancelled, or another run
took over) is not stored. A finished job that still has its upload or webhook to deliver keeps the
lease until they are done, so a run that dies in between leaves them to the next delivery of the
job, and two runs never deliver at once. Files are written whole (temporary name, fsync, rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from serve_app.jobs.records import JOB_ID, Delivery, JobRecord
from serve_app.schemas import ChunkInfo
from serve_app.voices.files import write_atomically

# "deliver": the job is finished, and its lease is taken to deliver what it asked for.
LeaseAnswer = Literal["acquired", "held", "finished", "deliver"]


class JobStore:
    def __init__(self, root: Path, retention_s: float) -> None:
        self.root = root / "jobs"
        self._retention_s = retention_s

    def _dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):  # also keeps a path out of the store
            raise KeyError(job_id)
        return self.root / job_id

    def create(self, record: JobRecord, request: dict[str, Any], reference: bytes | None) -> None:
        folder = self._dir(record.id)
        (folder / "chunks").mkdir(parents=True)
        write_atomically(folder / "request.json", json.dumps(request).encode())
        if reference is not None:
            write_atomically(folder / "reference", reference)
        write_atomically(folder / "record.json", record.model_dump_json().encode())

    def get(self, job_id: str, now: float | None = None) -> JobRecord | None:
        """The job's record; None when there is none, or it expired (then it is deleted)."""
        try:
            record = JobRecord.model_validate_json((self._dir(job_id) / "record.json").read_bytes())
        except (KeyError, FileNotFoundError):
            return None
        if self._expired(record, time.time() if now is None else now):
            shutil.rmtree(self._dir(job_id), ignore_errors=True)
            return None
        return record

    def _expired(self, record: JobRecord, now: float) -> bool:
        return record.finished_at is not None and now - record.finished_at > self._retention_s

    @contextlib.contextmanager
    def _locked(self, job_id: str) -> Iterator[Path]:
        folder = self._dir(job_id)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Apply `change` to the record under its lock; it returns the new record, or None to keep
        the old one. Returns the record as it is afterwards (None: no such job)."""
        try:
            with self._locked(job_id) as folder:
                record = JobRecord.model_validate_json((folder / "record.json").read_bytes())
                changed = change(record)
                if changed is not None:
                    write_atomically(folder / "record.json", changed.model_dump_json().encode())
                    record = changed
                return record
        except (KeyError, FileNotFoundError):  # no such job (or it was just deleted)
            return None

    def request(self, job_id: str) -> tuple[dict[str, Any], bytes | None]:
        folder = self._dir(job_id)
        reference = folder / "reference"
        return (
            json.loads((folder / "request.json").read_bytes()),
            reference.read_bytes() if reference.exists() else None,
        )

    def acquire_lease(self, job_id: str, owner: str, lease_s: float) -> LeaseAnswer:
        """Take the job's lease for `owner` unless another run's is live, or the job is finished
        with nothing left to deliver."""
        answer: LeaseAnswer = "held"

        def take(record: JobRecord) -> JobRecord | None:
            nonlocal answer
            now = time.time()
            if record.finished and not record.delivery_pending:
                answer = "finished"
                return None
            if record.lease_live(now) and record.lease_owner != owner:
                return None
            if record.finished:
                answer = "deliver"
                return record.model_copy(update={"lease_owner": owner, "lease_expires": now + lease_s})
            answer = "acquired"
            return record.model_copy(
                update={
                    "status": "running",
                    "lease_owner": owner,
                    "lease_expires": now + lease_s,
                    "started_at": record.started_at or now,
                    "runs": record.runs + 1,
                }
            )

        return answer if self.update(job_id, take) is not None else "finished"

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease; False when it no longer holds it (cancelled, finished, taken over)."""
        held = False

        def renew(record: JobRecord) -> JobRecord | None:
            nonlocal held
            held = record.lease_owner == owner and (not record.finished or record.delivery_pending)
            return record.model_copy(update={"lease_expires": time.time() + lease_s}) if held else None

        self.update(job_id, renew)
        return held

    def save_chunk(self, job_id: str, index: int, audio: np.ndarray, sample_rate: int, owner: str) -> bool:
        """Checkpoint chunk `index` if `owner` still holds the job's lease (else store nothing)."""
        stored = False

        def save(record: JobRecord) -> JobRecord | None:
            nonlocal stored
            path = self._dir(job_id) / "chunks" / f"{index:05d}.npy"
            if record.lease_owner != owner or record.finished or path.exists():
                return None
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(audio, dtype=np.float32), allow_pickle=False)
            write_atomically(path, buffer.getvalue())
            stored = True
            now = time.time()
            return record.model_copy(
                update={
                    "chunks_done": record.chunks_done + 1,
                    "audio_seconds": record.audio_seconds + len(audio) / sample_rate,
                    "first_progress_at": record.first_progress_at or now,
                }
            )

        self.update(job_id, save)
        return stored

    def chunks(self, job_id: str) -> dict[int, np.ndarray]:
        """The checkpointed chunks by index."""
        return {
            int(path.stem): np.load(path, allow_pickle=False)
            for path in sorted((self._dir(job_id) / "chunks").glob("*.npy"))
        }

    def resume(self, job_id: str, owner: str, sample_rate: int) -> dict[int, np.ndarray]:
        """The checkpointed chunks, with the record's progress counted again from them if `owner`
        holds the lease: a run killed between writing a chunk and counting it left it one short."""
        chunks = self.chunks(job_id)

        def recount(record: JobRecord) -> JobRecord | None:
            if record.lease_owner != owner or record.finished:
                return None
            samples = sum(len(audio) for audio in chunks.values())
            return record.model_copy(
                update={"chunks_done": len(chunks), "audio_seconds": samples / sample_rate}
            )

        self.update(job_id, recount)
        return chunks

    def finish(
        self, job_id: str, owner: str, change: Callable[[JobRecord], JobRecord], files: dict[str, bytes]
    ) -> JobRecord | None:
        """End `owner`'s run: write `files` (name -> bytes) and apply `change`, if it still holds the
        lease (kept while a delivery is pending); the record afterwards, or None when it did not
        (nothing was stored)."""
        done = False

        def end(record: JobRecord) -> JobRecord | None:
            nonlocal done
            if record.lease_owner != owner or record.finished:
                return None
            for name, data in files.items():
                write_atomically(self._dir(job_id) / name, data)
            done = True
            ended = change(record).model_copy(update={"finished_at": time.time()})
            return ended if ended.delivery_pending else _released(ended)

        record = self.update(job_id, end)
        return record if done else None

    def delivered(self, job_id: str, owner: str, delivery: Delivery) -> None:
        """Record how `owner` delivered the finished job, and release its lease."""

        def end(record: JobRecord) -> JobRecord | None:
            if record.lease_owner != owner:
                return None
            return _released(record.model_copy(update={"delivery": delivery}))

        self.update(job_id, end)

    def audio_path(self, job_id: str) -> Path:
        return self._dir(job_id) / "audio"

    def result_chunks(self, job_id: str) -> list[ChunkInfo]:
        data = json.loads((self._dir(job_id) / "result.json").read_bytes())
        return [ChunkInfo.model_validate(chunk) for chunk in data]

    def counts(self) -> Counter[str]:
        """Jobs by status, and how many were run more than once ("retried")."""
        counts: Counter[str] = Counter()
        for record in self._records(lambda _: True):
            counts[record.status] += 1
            counts["retried"] += record.runs > 1
        return counts

    def interrupted(self) -> list[str]:
        """Jobs a run started and did not finish, or finished and did not deliver."""
        return [r.id for r in self._records(lambda r: r.status == "running" or r.delivery_pending)]

    def _records(self, keep: Callable[[JobRecord], bool]) -> Iterator[JobRecord]:
        for path in self.root.glob("*/record.json") if self.root.exists() else ():
            with contextlib.suppress(FileNotFoundError, ValueError):
                record = JobRecord.model_validate_json(path.read_bytes())
                if keep(record):
                    yield record

    def sweep(self, now: float | None = None) -> int:
        """Delete the jobs whose retention has passed; how many."""
        now = time.time() if now is None else now
        expired = list(self._records(lambda r: self._expired(r, now)))
        for record in expired:
            shutil.rmtree(self._dir(record.id), ignore_errors=True)
        return len(expired)


def _released(record: JobRecord) -> JobRecord:
    return record.model_copy(update={"lease_owner": None, "lease_expires": None})
