"""The job store on a directory (no Ray): records, leases, chunk checkpoints, results, expiry."""

from __future__ import annotations

import time

import numpy as np

from serve_app.jobs.records import Delivery, JobRecord, new_job_id
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


def finish_with_webhook(store: JobStore, owner: str) -> JobRecord:
    job = JobRecord(
        id=new_job_id(), format="wav", chunks_total=1, created_at=time.time(), webhook="http://127.0.0.1/h"
    )
    store.create(job, {"text": "hello"}, None)
    assert store.acquire_lease(job.id, owner, lease_s=0.5) == "acquired"
    return store.finish(job.id, owner, lambda r: r.model_copy(update={"status": "completed"}), {})


def test_a_finished_job_keeps_its_lease_until_delivered(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    done = finish_with_webhook(store, "run")
    assert done.delivery_pending and done.lease_owner == "run"
    assert store.interrupted() == [done.id]
    assert store.acquire_lease(done.id, "second", lease_s=5) == "held"  # the run is delivering
    assert store.renew_lease(done.id, "run", lease_s=0.5)
    store.delivered(done.id, "run", Delivery(webhook_delivered=True))
    record = store.get(done.id)
    assert record.lease_owner is None and record.delivery.webhook_delivered is True
    assert not record.delivery_pending and store.interrupted() == []
    assert store.acquire_lease(done.id, "second", lease_s=5) == "finished"


def test_a_run_that_died_before_delivering_leaves_it_to_the_next(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    done = finish_with_webhook(store, "run")
    time.sleep(0.6)  # the run died after finishing: its lease lapses
    assert store.acquire_lease(done.id, "second", lease_s=5) == "deliver"
    record = store.get(done.id)
    assert record.status == "completed" and record.runs == 1 and record.lease_owner == "second"
    store.delivered(done.id, "run", Delivery(webhook_delivered=True))  # not the holder: ignored
    assert store.get(done.id).delivery_pending
    store.delivered(done.id, "second", Delivery(webhook_delivered=False, error="webhook: 500"))
    assert not store.get(done.id).delivery_pending  # tried: the outcome is in the record


def test_interrupted_lists_started_unfinished_jobs_only(tmp_path):
    store = JobStore(tmp_path, retention_s=60)
    queued, running = make_job(store), make_job(store)
    store.acquire_lease(running.id, "run", lease_s=5)
    assert queued.id not in store.interrupted() == [running.id]


def test_a_resumed_run_counts_the_chunks_it_finds(tmp_path):
    """A run killed between writing chunk 1's file and counting it: the next run's progress is
    counted from the files, so a finished job shows every chunk done."""
    store = JobStore(tmp_path, retention_s=60)
    job = make_job(store)
    audio = np.ones(2400, dtype=np.float32)
    assert store.acquire_lease(job.id, "dead", lease_s=0.3) == "acquired"
    assert store.save_chunk(job.id, 0, audio, 24_000, "dead")
    np.save(tmp_path / "jobs" / job.id / "chunks" / "00001.npy", audio)  # written, never counted
    assert store.get(job.id).chunks_done == 1
    time.sleep(0.4)
    assert store.acquire_lease(job.id, "next", lease_s=5) == "acquired"
    assert sorted(store.resume(job.id, "late", 24_000)) == [0, 1]  # not the holder: no recount
    assert store.get(job.id).chunks_done == 1
    assert sorted(store.resume(job.id, "next", 24_000)) == [0, 1]
    record = store.get(job.id)
    assert record.chunks_done == 2 and record.audio_seconds == 0.2
