"""Durable jobs against a real Redis (Debian's redis-server on a free loopback port, started here)
and a real local Ray with the tiny CPU profile. The Ray and the app live for this package only, so
`tests/serve` can start its own afterwards in the same session."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs
from tests.serve.conftest import APP_NAME, CHUNK_MAX_NEW_TOKENS, REPO_ROOT, _free_port

LEASE_S = 3.0
VISIBILITY_TIMEOUT_S = 8.0  # how late a killed consumer's jobs are redelivered


@dataclass(frozen=True)
class JobsApp:
    url: str
    args: AppArgs
    jobs_dir: Path


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                import redis

                redis.Redis(host="127.0.0.1", port=port).ping()
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def jobs_args(tmp: Path, redis_url: str, **jobs: object) -> AppArgs:
    return AppArgs(
        model="tiny",
        tiny_cache_dir=str(tmp / "tiny-cache"),
        device="cpu",
        model_num_cpus=0,
        max_batch_size=8,
        max_new_tokens=CHUNK_MAX_NEW_TOKENS,
        watermark=True,
        limits={"max_text_chars": 6000, "max_active_requests": 8},  # /v1/tts of the fault test's texts
        ingress={"num_cpus": 0, "max_ongoing_requests": 16},
        stitcher={"num_cpus": 0},
        voices={"store_dir": str(tmp / "voices")},
        shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
        jobs={
            "enabled": True,
            "dir": str(tmp / "jobs"),
            "broker_url": redis_url,
            "max_text_chars": 30_000,
            "max_queued": 50,
            "allowed_hosts": ["127.0.0.1"],
            "lease_s": LEASE_S,
            "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
            "chunk_retry_delay_s": 1.0,
            "chunk_retries": 4,
            "consumer": {"num_cpus": 0, "max_ongoing_requests": 4},
            **jobs,
        },
    )


@pytest.fixture(scope="package")
def jobs_app(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[JobsApp]:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        tmp = tmp_path_factory.mktemp("jobs-app")
        args = jobs_args(tmp, redis_url)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield JobsApp(url=f"http://127.0.0.1:{port}", args=args, jobs_dir=tmp / "jobs")
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Received:
    method: str
    path: str
    body: bytes
    content_type: str | None


@dataclass
class Receiver:
    """A loopback HTTP server that records what it receives (the PUT target and webhook of a job)."""

    url: str
    requests: list[Received] = field(default_factory=list)
    fail_first: int = 0  # answer this many requests with 503 first
    # Hold the first request unanswered until `release` is set (or 60 s); `stalled` is set as it comes.
    stall_first: bool = False
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.requests


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}
    failures = {"seen": 0}

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            target = state["receiver"]
            if target.stall_first and not target.stalled.is_set():
                target.stalled.set()
                target.release.wait(60)
                return  # no answer: the connection closes
            if failures["seen"] < target.fail_first:
                failures["seen"] += 1
                self.send_response(503)
                self.end_headers()
                return
            target.requests.append(Received(self.command, self.path, body, self.headers.get("content-type")))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = _record  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["receiver"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["receiver"]
    finally:
        state["receiver"].release.set()
        server.shutdown()
        server.server_close()


def wait_job(app: JobsApp, job_id: str, timeout: float = 180.0, until: frozenset[str] | None = None) -> dict:
    """Poll `GET /v1/jobs/{id}` until the job is finished (or in `until`); its last status."""
    until = until or frozenset({"completed", "failed", "cancelled"})
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{app.url}/v1/jobs/{job_id}", timeout=30).json()
        if body["status"] in until or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def replica_actors(deployment: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    return {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    }


def kill(actor: str) -> None:
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)


def tts_audio(app: JobsApp, text: str, seed: int) -> bytes:
    """The same text and seed as one `/v1/tts` request, uninterrupted."""
    body = httpx.post(f"{app.url}/v1/tts", json={"text": text, "seed": seed, "format": "wav"}, timeout=300)
    return base64.b64decode(body.json()["audio_base64"])


def wait_progress(app: JobsApp, job_id: str, chunks: int, timeout: float = 120.0) -> dict:
    """Poll until the job has at least `chunks` chunks done; its status."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{app.url}/v1/jobs/{job_id}", timeout=30).json()
        if status["progress"]["chunks_done"] >= chunks or time.monotonic() > deadline:
            return status
        time.sleep(0.1)
