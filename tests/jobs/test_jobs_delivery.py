"""Job results where users keep them, captions, and the RunPod-compatible door, on a real Redis and
a real local Ray: PUT upload and webhook to a loopback receiver, allowed hosts, RunPod's shapes."""

from __future__ import annotations

import base64
import html
import io
import json

import httpx
import soundfile as sf
import srt
import webvtt

from serve_app.jobs.config import CONSUMER_DEPLOYMENT
from tests.jobs.conftest import kill, replica_actors, wait_job
from tests.serve.test_serve_app import paragraph

TEXT = paragraph(700, 4)


def test_output_url_gets_the_audio_and_webhook_the_final_status(jobs_app, receiver):
    receiver.fail_first = 1  # the first try is answered 503: the upload is retried
    body = {
        "text": TEXT,
        "seed": 3,
        "output_url": f"{receiver.url}/bucket/out.wav?sig=1",
        "webhook": f"{receiver.url}/hook",
    }
    job_id = httpx.post(f"{jobs_app.url}/v1/jobs", json=body, timeout=60).json()["id"]
    assert wait_job(jobs_app, job_id)["status"] == "completed"
    put, hook = receiver.wait_for(2)
    audio = httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30).content
    assert (put.method, put.path, put.content_type) == ("PUT", "/bucket/out.wav?sig=1", "audio/wav")
    assert put.body == audio
    assert hook.method == "POST" and hook.path == "/hook"
    status = json.loads(hook.body)
    assert status["id"] == job_id and status["status"] == "completed"
    assert status["progress"]["chunks_done"] == status["progress"]["chunks_total"]
    assert status["delivery"]["output_uploaded"] is True
    final = wait_job(jobs_app, job_id)
    assert final["delivery"] == {"output_uploaded": True, "webhook_delivered": True, "error": None}


def test_a_consumer_killed_while_delivering_leaves_the_delivery_to_the_next(jobs_app, receiver):
    """The job finished, its upload stalls and its consumer dies: Redis redelivers the task, and the
    next run delivers (before, the finished job was never delivered)."""
    receiver.stall_first = True
    body = {
        "text": TEXT,
        "seed": 5,
        "output_url": f"{receiver.url}/out.wav",
        "webhook": f"{receiver.url}/hook",
    }
    job_id = httpx.post(f"{jobs_app.url}/v1/jobs", json=body, timeout=60).json()["id"]
    assert receiver.stalled.wait(120)
    assert wait_job(jobs_app, job_id)["status"] == "completed"
    (consumer,) = replica_actors(CONSUMER_DEPLOYMENT)
    kill(consumer)
    receiver.release.set()
    put, hook = receiver.wait_for(2, timeout=120)
    assert (put.method, put.path) == ("PUT", "/out.wav")
    assert put.body == httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30).content
    assert json.loads(hook.body)["delivery"]["output_uploaded"] is True
    final = wait_job(jobs_app, job_id)
    assert final["delivery"] == {"output_uploaded": True, "webhook_delivered": True, "error": None}
    assert len(receiver.requests) == 2  # delivered once


def test_captions_of_a_job_parse_and_match_its_audio(jobs_app):
    job_id = httpx.post(f"{jobs_app.url}/v1/jobs", json={"text": TEXT, "seed": 3}, timeout=60).json()["id"]
    status = wait_job(jobs_app, job_id)
    url = f"{jobs_app.url}/v1/jobs/{job_id}/captions"
    srt_text = httpx.get(url, params={"format": "srt"}, timeout=30)
    assert srt_text.headers["content-type"].startswith("application/x-subrip")
    cues = list(srt.parse(srt_text.text))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == " ".join(TEXT.split())
    assert cues[0].start.total_seconds() == 0
    assert abs(cues[-1].end.total_seconds() - status["duration_s"]) < 1e-3  # the last chunk ends the audio
    vtt = webvtt.from_buffer(io.StringIO(httpx.get(url, params={"format": "vtt"}, timeout=30).text))
    assert [html.unescape(c.text) for c in vtt] == [c.content for c in cues]
    segments = httpx.get(url, params={"format": "json"}, timeout=30).json()
    assert [s["text"] for s in segments] == [c.content for c in cues]
    bad = httpx.get(url, params={"format": "ass"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "format"


def test_tts_answers_captions_when_asked(jobs_app):
    body = {"text": TEXT, "seed": 3, "captions": "srt"}
    answer = httpx.post(f"{jobs_app.url}/v1/tts", json=body, timeout=120).json()
    cues = list(srt.parse(answer["captions"]))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == " ".join(TEXT.split())
    assert abs(cues[-1].end.total_seconds() - answer["duration_s"]) < 1e-3
    plain = httpx.post(f"{jobs_app.url}/v1/tts", json={"text": "No captions."}, timeout=120).json()
    assert "captions" not in plain


def test_runpod_door_speaks_runpod_shapes(jobs_app, receiver):
    base = f"{jobs_app.url}/v2/my-endpoint"
    before = httpx.get(f"{base}/health", timeout=30).json()["jobs"]  # other tests' jobs count too
    run = httpx.post(
        f"{base}/run", json={"input": {"text": TEXT, "seed": 3}, "webhook": f"{receiver.url}/rp"}, timeout=60
    )
    assert run.status_code == 200, run.text
    assert run.json() == {"id": run.json()["id"], "status": "IN_QUEUE"}
    job_id = run.json()["id"]
    wait_job(jobs_app, job_id)
    status = httpx.get(f"{base}/status/{job_id}", timeout=30).json()
    assert status["status"] == "COMPLETED"
    assert set(status) == {"id", "status", "delayTime", "executionTime", "output"}
    wav, sample_rate = sf.read(io.BytesIO(base64.b64decode(status["output"]["audio_base64"])))
    assert sample_rate == status["output"]["sample_rate"] == 24_000
    assert len(wav) / sample_rate == status["output"]["duration_s"]
    # The same job's audio through /v1/jobs: RunPod's output is that file.
    assert (
        base64.b64decode(status["output"]["audio_base64"])
        == httpx.get(f"{jobs_app.url}/v1/jobs/{job_id}/audio", timeout=30).content
    )
    (hook,) = receiver.wait_for(1)
    assert json.loads(hook.body)["status"] == "COMPLETED" and json.loads(hook.body)["id"] == job_id

    sync = httpx.post(
        f"{base}/runsync", json={"input": {"text": "Quick one.", "seed": 1}}, timeout=120
    ).json()
    assert sync["status"] == "COMPLETED" and sync["output"]["audio_base64"]
    pending = httpx.post(
        f"{base}/runsync", params={"wait": 1000}, json={"input": {"text": paragraph(3000, 2)}}, timeout=60
    ).json()
    assert pending["status"] in ("IN_QUEUE", "IN_PROGRESS") and "output" not in pending
    cancelled = httpx.post(f"{base}/cancel/{pending['id']}", timeout=30).json()
    assert cancelled["status"] == "CANCELLED"
    assert httpx.get(f"{base}/status/{pending['id']}", timeout=30).json()["status"] == "CANCELLED"

    health = httpx.get(f"{base}/health", timeout=30).json()
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert health["jobs"]["completed"] >= before["completed"] + 2
    assert health["jobs"]["failed"] == before["failed"]
    assert health["workers"]["idle"] + health["workers"]["running"] == 1

    unknown = httpx.get(f"{base}/status/{'f' * 32}", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"
    refused = httpx.post(
        f"{base}/run", json={"input": {"text": "x"}, "webhook": "http://10.0.0.1/"}, timeout=30
    )
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "webhook"
    bad_input = httpx.post(f"{base}/run", json={"input": {}}, timeout=30)
    assert bad_input.status_code == 422 and bad_input.json()["error"]["field"] == "input.text"
