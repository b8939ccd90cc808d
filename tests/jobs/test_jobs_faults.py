"""Faults under load (`-m load`), on a real Redis and a real local Ray: the consumer replica killed
while it runs ten jobs, then a model replica killed mid-job. Every job completes, once.

Ten jobs of ~5,000 characters. Bytes: a resumed job stitches its checkpointed chunks (exact
float32) with the rest, and on the CPU a chunk's audio does not depend on what else the engine has
in flight (`tests/test_batch_invariance.py`), so the resumed job equals an uninterrupted `/v1/tts`
run of the same text and seed byte for byte, under this load as alone.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serve_app.jobs.config import CONSUMER_DEPLOYMENT
from tests.jobs.conftest import kill, replica_actors, tts_audio, wait_job, wait_progress
from tests.serve.test_serve_app import paragraph

pytestmark = pytest.mark.load

JOBS = 10
CHARS = 5000


def test_a_killed_consumer_resumes_every_job_once(jobs_app, receiver):
    texts = [paragraph(CHARS, i) for i in range(JOBS)]
    ids = [
        httpx.post(
            f"{jobs_app.url}/v1/jobs",
            json={"text": text, "seed": 100 + i, "webhook": f"{receiver.url}/{i}"},
            timeout=60,
        ).json()["id"]
        for i, text in enumerate(texts)
    ]
    started = time.monotonic()
    while True:  # kill once some jobs are part done
        now = {i: httpx.get(f"{jobs_app.url}/v1/jobs/{i}", timeout=30).json()["progress"] for i in ids}
        part_done = [i for i, p in now.items() if 0 < p["chunks_done"] < p["chunks_total"]]
        if len(part_done) >= 2 or time.monotonic() - started > 120:
            break
        time.sleep(0.2)
    assert len(part_done) >= 2, now
    (consumer,) = replica_actors(CONSUMER_DEPLOYMENT)
    kill(consumer)

    final = {i: wait_job(jobs_app, i, timeout=300) for i in ids}
    print(
        f"\n{JOBS} jobs of {CHARS} characters, consumer killed with {len(part_done)} part done: "
        f"all finished {time.monotonic() - started:.0f} s after submitting"
    )
    assert replica_actors(CONSUMER_DEPLOYMENT) - {consumer}
    for i in ids:
        status = final[i]
        assert status["status"] == "completed", status
        # Every chunk stored once: a second store of a chunk is refused, and would count twice.
        assert status["progress"]["chunks_done"] == status["progress"]["chunks_total"]
        assert (
            len(list((jobs_app.jobs_dir / "jobs" / i / "chunks").iterdir()))
            == status["progress"]["chunks_total"]
        )
    receiver.wait_for(JOBS)
    time.sleep(1)  # a second delivery of any job would arrive by now
    assert sorted(json.loads(r.body)["id"] for r in receiver.requests) == sorted(ids)  # each job once

    resumed = part_done[0]
    never_started = next(i for i in ids if now[i]["chunks_done"] == 0)
    for label, job_id in (("resumed", resumed), ("not interrupted", never_started)):
        k = ids.index(job_id)
        audio = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30).content
        assert audio == tts_audio(jobs_app, texts[k], 100 + k), label


def test_a_job_survives_a_killed_model_replica(jobs_app):
    text = paragraph(CHARS, 7)
    job_id = httpx.post(f"{jobs_app.url}/v1/jobs", json={"text": text, "seed": 9}, timeout=60).json()["id"]
    assert wait_progress(jobs_app, job_id, 1)["progress"]["chunks_done"] >= 1
    (model,) = replica_actors("TurboModel")
    kill(model)
    status = wait_job(jobs_app, job_id, timeout=300)
    assert status["status"] == "completed", status
    assert replica_actors("TurboModel") - {model}
    audio = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30).content
    assert audio == tts_audio(jobs_app, text, 9)
