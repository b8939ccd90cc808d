"""The job store on a directory (no Ray): records, leases, chunk checkpoints, results, expiry."""

from __future__ import annotations

import time

import numpy as np

from serve_app.jobs.records import JobRecord, new_job_id
from serve_app.jobs.store import JobStore


def make_job(store: JobStore, chunks: int = 3) -> JobRecord:
    record = JobRecord(id=new_job_id(), format="wav", chunks_total=chunks, created_at=time.time())
    store.create(record, {"text": "hello", "seed": 1}, b"clip")
    return record


def test_ids_are_128_random_bits_and_nothing_else_names_a_job(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)
    assert store.get("../../etc/passwd") is None
    assert store.get("0" * 32) is None
    assert store.update("0" * 32, lambda r: r) is None


def test_request_and_clip_are_kept(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    job = make_job(store)
    assert store.request(job.id) == ({"text": "hello", "seed": 1}, b"clip")
    assert store.get(job.id) == job


def test_one_live_lease_at_a_time_and_a_lapsed_one_is_taken_over(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    job = make_job(store)
    assert store.acquire_lease(job.id, "first", lease_s=0.5) == "acquired"
    assert store.acquire_lease(job.id, "second", lease_s=0.5) == "held"
    assert store.renew_lease(job.id, "first", lease_s=0.5)
    assert not store.renew_lease(job.id, "second", lease_s=0.5)
    time.sleep(0.6)  # the first run died: its lease lapses
    assert store.acquire_lease(job.id, "second", lease_s=5) == "acquired"
    record = store.get(job.id)
    assert record.status == "running" and record.runs == 2 and record.lease_owner == "second"
    assert not store.renew_lease(job.id, "first", lease_s=5)


def test_only_the_lease_holder_stores_chunks_and_each_chunk_once(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    job = make_job(store)
    audio = np.linspace(-1, 1, 2400, dtype=np.float32)
    assert store.acquire_lease(job.id, "run", lease_s=5) == "acquired"
    assert store.save_chunk(job.id, 0, audio, 24_000, "run")
    assert not store.save_chunk(job.id, 0, audio * 0, 24_000, "run")  # stored already
    assert not store.save_chunk(job.id, 1, audio, 24_000, "someone-else")
    chunks = store.chunks(job.id)
    assert list(chunks) == [0]
    assert chunks[0].tobytes() == audio.tobytes()  # exact samples: a resumed job stitches the same
    record = store.get(job.id)
    assert record.chunks_done == 1 and record.audio_seconds == 0.1 and record.first_progress_at

    finished = store.finish(
        job.id, "someone-else", lambda r: r.model_copy(update={"status": "completed"}), {}
    )
    assert finished is None
    done = store.finish(
        job.id, "run", lambda r: r.model_copy(update={"status": "completed"}), {"audio": b"RIFF"}
    )
    assert done.status == "completed" and done.lease_owner is None and done.finished_at
    assert store.audio_path(job.id).read_bytes() == b"RIFF"
    assert store.acquire_lease(job.id, "late", lease_s=5) == "finished"
    assert not store.save_chunk(job.id, 2, audio, 24_000, "run")  # nothing after the end


def test_finished_jobs_expire_after_retention(tmp_path):
    store = JobStore(tmp_path, retention_s=10)
    old, running = make_job(store), make_job(store)
    store.acquire_lease(old.id, "run", lease_s=5)
    store.finish(old.id, "run", lambda r: r.model_copy(update={"status": "failed"}), {})
    now = time.time()
    assert store.get(old.id, now=now + 5) is not None
    assert store.counts()["failed"] == 1 and store.counts()["queued"] == 1
    assert store.sweep(now=now + 11) == 1
    assert store.get(old.id) is None
    assert store.get(running.id) is not None  # unfinished jobs never expire
