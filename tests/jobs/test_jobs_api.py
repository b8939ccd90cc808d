"""`/v1/jobs` end to end on a real Redis and a real local Ray: submit, poll, audio (Range), cancel,
expiry, errors."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import httpx
import soundfile as sf

from serve_app.jobs.broker import RUN_JOB_TASK, producer
from serve_app.jobs.config import CONSUMER_DEPLOYMENT
from serve_app.jobs.records import JobRecord, new_job_id
from serve_app.jobs.store import JobStore
from tests.jobs.conftest import kill, replica_actors, tts_audio, wait_job, wait_progress
from tests.serve.test_serve_app import paragraph

TEXT = paragraph(900, 0)


def submit(app, body: dict) -> httpx.Response:
    return httpx.post(f"{app.url}/v1/jobs", json=body, timeout=60)


def test_job_audio_is_the_tts_answer_for_the_same_text_and_seed(jobs_app):
    response = submit(jobs_app, {"text": TEXT, "seed": 5})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert len(accepted["id"]) == 32 and int(accepted["id"], 16) >= 0

    status = wait_job(jobs_app, accepted["id"])
    assert status["status"] == "completed", status
    progress = status["progress"]
    assert progress["chunks_done"] == progress["chunks_total"] >= 3
    assert progress["audio_seconds"] > 0
    timings = status["timings"]
    assert 0 <= timings["queued_s"] <= timings["time_to_first_progress_s"] <= timings["total_s"]

    audio = httpx.get(f"{jobs_app.url}/v1/jobs/{accepted['id']}/audio", timeout=30)
    assert audio.status_code == 200
    assert audio.headers["content-type"] == "audio/wav"
    wav, sample_rate = sf.read(io.BytesIO(audio.content), dtype="int16")
    assert sample_rate == status["sample_rate"] == 24_000
    assert len(wav) / sample_rate == status["duration_s"]

    tts = httpx.post(f"{jobs_app.url}/v1/tts", json={"text": TEXT, "seed": 5}, timeout=120).json()
    expected = base64.b64decode(tts["audio_base64"])
    assert len(sf.read(io.BytesIO(expected))[0]) == len(wav)
    assert audio.content == expected  # same chunks, seeds, stitching and watermark: the same file

    # Range requests: a part of the file, 206.
    part = httpx.get(
        f"{jobs_app.url}/v1/jobs/{accepted['id']}/audio", headers={"Range": "bytes=0-43"}, timeout=30
    )
    assert part.status_code == 206
    assert part.content == audio.content[:44]
    assert part.headers["content-range"] == f"bytes 0-43/{len(audio.content)}"


def test_unknown_job_is_404_and_bad_ids_too(jobs_app):
    for job_id in ("0" * 32, "not-a-job", "..%2F..%2Fetc"):
        response = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}", timeout=30)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] in ("job_not_found", "not_found")
    response = httpx.delete(f"{jobs_app.url}/v1/jobs/{'0' * 32}", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "job_not_found",
        "message": f"no job {'0' * 32!r} (unknown, or expired)",
        "field": "job_id",
    }


def test_cancel_stops_a_running_job_and_a_finished_one_is_409(jobs_app):
    job_id = submit(jobs_app, {"text": paragraph(4000, 3), "seed": 1}).json()["id"]
    running = wait_job(jobs_app, job_id, until=frozenset({"running"}))
    assert running["status"] == "running"
    cancelled = httpx.delete(f"{jobs_app.url}/v1/jobs/{job_id}", timeout=30)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    chunks_dir = jobs_app.jobs_dir / "jobs" / job_id / "chunks"
    time.sleep(3)  # the run sees the cancel at its next lease renewal (a third of lease_s)
    stored = sorted(chunks_dir.iterdir())
    time.sleep(4)
    assert sorted(chunks_dir.iterdir()) == stored  # nothing further is stored
    status = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}", timeout=30).json()
    assert status["status"] == "cancelled"
    assert status["progress"]["chunks_done"] < status["progress"]["chunks_total"]
    assert not (jobs_app.jobs_dir / "jobs" / job_id / "audio").exists()

    again = httpx.delete(f"{jobs_app.url}/v1/jobs/{job_id}", timeout=30)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"
    audio = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30)
    assert audio.status_code == 409
    assert audio.json()["error"]["code"] == "job_not_completed"


def test_a_finished_job_expires_after_retention(jobs_app):
    job_id = submit(jobs_app, {"text": "A short job.", "seed": 2}).json()["id"]
    assert wait_job(jobs_app, job_id)["status"] == "completed"
    record_path = jobs_app.jobs_dir / "jobs" / job_id / "record.json"
    record = JobRecord.model_validate_json(record_path.read_bytes())
    aged = record.finished_at - jobs_app.args.jobs.retention_s - 1  # as if retention_s had passed
    record_path.write_text(record.model_copy(update={"finished_at": aged}).model_dump_json())
    response = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    assert not record_path.parent.exists()  # its files are deleted


def test_bad_job_bodies_are_refused_naming_the_field(jobs_app):
    cases = [
        ({"seed": 1}, 422, "missing_parameter", "text"),
        ({"text": "x", "output_url": "ftp://127.0.0.1/x"}, 422, "invalid_parameter", "output_url"),
        ({"text": "x", "webhook": "http://169.254.169.254/latest"}, 422, "host_not_allowed", "webhook"),
        ({"text": "x", "output_url": "http://example.com/put"}, 422, "host_not_allowed", "output_url"),
        ({"text": "x" * 30_001}, 413, "text_too_long", "text"),
        ({"text": "x", "reference_audio_base64": "%%%"}, 400, "invalid_base64", "reference_audio_base64"),
        ({"text": "x", "voice": "nobody"}, 404, "voice_not_found", "voice"),
    ]
    for body, status, code, field in cases:
        response = submit(jobs_app, body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["code"] == code, body
        assert response.json()["error"]["field"] == field, body
    # Longer than /v1/tts takes, within the jobs' limit: accepted.
    long_text = paragraph(6000, 1)
    assert httpx.post(f"{jobs_app.url}/v1/tts", json={"text": long_text}, timeout=30).status_code == 413
    job = submit(jobs_app, {"text": long_text})
    assert job.status_code == 202
    httpx.delete(f"{jobs_app.url}/v1/jobs/{job.json()['id']}", timeout=30)
    assert (
        json.loads(httpx.get(f"{jobs_app.url}/v1/jobs/{job.json()['id']}", timeout=30).text)["status"]
        == "cancelled"
    )


def test_a_full_queue_is_503_with_retry_after(jobs_app):
    store = JobStore(jobs_app.jobs_dir, jobs_app.args.jobs.retention_s)
    queued = [
        JobRecord(id=new_job_id(), format="wav", chunks_total=1, created_at=time.time())
        for _ in range(jobs_app.args.jobs.max_queued)
    ]
    for record in queued:  # as many jobs waiting as the queue takes (never handed to the broker)
        store.create(record, {"text": "waiting"}, None)
    try:
        response = submit(jobs_app, {"text": "One too many."})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == str(jobs_app.args.limits.retry_after_s)
        assert response.json()["error"]["code"] == "queue_full"
    finally:
        for record in queued:
            shutil.rmtree(jobs_app.jobs_dir / "jobs" / record.id)


def test_a_job_that_cannot_run_fails_with_the_error_code(jobs_app):
    # A job whose saved voice was deleted after it was accepted: written and queued as the front end
    # does, with a voice that no longer exists.
    store = JobStore(jobs_app.jobs_dir, jobs_app.args.jobs.retention_s)
    record = JobRecord(id=new_job_id(), format="wav", chunks_total=1, created_at=time.time())
    store.create(record, {"text": "Read by a voice that is gone.", "voice": "deleted-voice"}, None)
    producer(jobs_app.args.jobs).enqueue_task_sync(RUN_JOB_TASK, args=[record.id], task_id=record.id)
    status = wait_job(jobs_app, record.id, timeout=60)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "voice_not_found"
    assert status["error"]["field"] == "voice"
    assert httpx.get(f"{jobs_app.url}/v1/jobs/{record.id}/audio", timeout=30).status_code == 409


def test_a_job_resumed_after_its_consumer_died_is_byte_identical(jobs_app):
    """Checkpoint and resume: the consumer replica is killed mid-job; Redis redelivers the task
    (visibility timeout), the new run waits out the dead run's lease, keeps the checkpointed chunks
    and synthesises the rest. Alone, chunks come out bit for bit the same, so the bytes do too."""
    text = paragraph(2500, 5)
    job_id = submit(jobs_app, {"text": text, "seed": 21}).json()["id"]
    part = wait_progress(jobs_app, job_id, 2)["progress"]
    assert 2 <= part["chunks_done"] < part["chunks_total"]
    (consumer,) = replica_actors(CONSUMER_DEPLOYMENT)
    kill(consumer)
    status = wait_job(jobs_app, job_id, timeout=240)
    assert status["status"] == "completed", status
    record = JobRecord.model_validate_json((jobs_app.jobs_dir / "jobs" / job_id / "record.json").read_bytes())
    assert record.runs == 2  # redelivered once, resumed
    audio = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30).content
    assert audio == tts_audio(jobs_app, text, 21)


def test_the_published_document_states_the_jobs_text_limit(jobs_app):
    document = httpx.get(f"{jobs_app.url}/openapi.json", timeout=30).json()
    limit = jobs_app.args.jobs.max_text_chars
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["text"]["maxLength"] == limit
    runpod = document["paths"]["/v2/{endpoint_id}/run"]["post"]["requestBody"]["content"]["application/json"]
    fields = runpod["schema"]["$defs"][runpod["schema"]["properties"]["input"]["$ref"].rsplit("/", 1)[-1]]
    assert fields["properties"]["text"]["maxLength"] == limit
    tts = document["paths"]["/v1/tts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert tts["properties"]["text"]["maxLength"] == jobs_app.args.limits.max_text_chars
