"""Scaling and faults on a real local Ray (issue 17, item 5): autoscaling up and back down, a redeploy
under load, a model replica killed mid-load, and overload at twice the measured capacity.

Each test deploys its own application (tiny checkpoint, CPU) beside the session's `tts` app, on the
same Ray and HTTP proxy, and deletes it afterwards. All load goes to 127.0.0.1, bounded in count and
time. Run with `pytest -m load`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import httpx
import pytest
import ray
import soundfile as sf
from ray import serve
from ray.serve.schema import ApplicationStatus, DeploymentStatus

from serve_app.app import build_app
from serve_app.config import AppArgs

pytestmark = pytest.mark.load

TEXT = "The lighthouse keeper climbed the stairs before dawn."  # one chunk
MODEL = "TurboModel"
REQUEST_TIMEOUT_S = 30.0  # a client's patience; no request may take longer than this


def app_args(tiny_cache_dir: str, **overrides: Any) -> AppArgs:
    """The ops apps' settings: tiny model on CPU, no CPU reservations, short Serve delays."""
    base: dict[str, Any] = {
        "model": "tiny",
        "tiny_cache_dir": tiny_cache_dir,
        "device": "cpu",
        "model_num_cpus": 0,
        "max_batch_size": 4,
        "max_new_tokens": 25,  # 1 s of audio per chunk at most
        "watermark": False,  # the two cores go to the model, which is what these tests load
        "ingress": {"num_cpus": 0},
        "stitcher": {"num_cpus": 0},
        "shutdown": {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
    }
    return AppArgs(**{**base, **overrides})


@dataclass(frozen=True)
class OpsApp:
    name: str
    url: str  # POST {url}/v1/tts
    tiny_cache_dir: str

    def deploy(self, **overrides: Any) -> None:
        """Deploy or redeploy this app with `app_args(**overrides)`; returns once it is running."""
        args = app_args(self.tiny_cache_dir, **overrides)
        serve.run(build_app(args), name=self.name, route_prefix=f"/{self.name}")

    def model_status(self) -> Any:
        return serve.status().applications[self.name].deployments[MODEL]

    def running_replicas(self) -> int:
        return self.model_status().replica_states.get("RUNNING", 0)  # keys: a str enum

    def model_replica_actors(self) -> set[str]:
        prefix = f"SERVE_REPLICA::{self.name}#{MODEL}#"
        actors = ray.util.list_named_actors(all_namespaces=True)
        return {a["name"] for a in actors if a["name"].startswith(prefix)}

    def is_healthy(self) -> bool:
        status = serve.status().applications[self.name]
        return status.status == ApplicationStatus.RUNNING and all(
            d.status == DeploymentStatus.HEALTHY for d in status.deployments.values()
        )


@pytest.fixture
def ops_app(serve_app, request: pytest.FixtureRequest) -> Iterator[Callable[..., OpsApp]]:
    """`ops_app(**overrides)` deploys a fresh app named after the test; it is deleted afterwards."""
    names: list[str] = []

    def deploy(**overrides: Any) -> OpsApp:
        name = f"ops-{request.node.name.removeprefix('test_')[:40]}".replace("_", "-")
        app = OpsApp(name=name, url=f"{serve_app.url}/{name}", tiny_cache_dir=serve_app.args.tiny_cache_dir)
        app.deploy(**overrides)
        names.append(name)
        return app

    yield deploy
    for name in names:
        serve.delete(name)


def outcome(response: httpx.Response) -> str:
    """`audio`, `refused` (a clean 503/429: our JSON error body and a Retry-After), or what went wrong."""
    if response.status_code == 200:
        audio = base64.b64decode(response.json()["audio_base64"])
        wav, _ = sf.read(io.BytesIO(audio))
        return "audio" if len(wav) > 0 else "empty audio"
    if response.status_code in (429, 503):
        try:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"{response.status_code} without our JSON body: {response.text[:200]!r}"
        retry_after = response.headers.get("retry-after", "")
        if not retry_after.isdigit() or int(retry_after) < 1:
            return f"{response.status_code} {error['code']} without Retry-After"
        return "refused"
    return f"{response.status_code}: {response.text[:300]!r}"


def transport_failure(error: httpx.HTTPError) -> str:
    return "timed out" if isinstance(error, httpx.TimeoutException) else f"transport error: {error!r}"


def tts_body(i: int) -> dict[str, Any]:
    return {"text": TEXT, "seed": i, "format": "wav"}


@dataclass
class ClosedLoad:
    """`clients` threads, each posting one request after another until stopped (a closed loop)."""

    url: str
    clients: int
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> ClosedLoad:
        for c in range(self.clients):
            thread = threading.Thread(target=self._client, args=(c,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self._threads)

    @property
    def completed(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def _client(self, c: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            i = 0
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    result = outcome(client.post(f"{self.url}/v1/tts", json=tts_body(1000 * c + i)))
                except httpx.HTTPError as error:
                    result = transport_failure(error)
                with self._lock:
                    self.outcomes[result] += 1
                    self.latencies.append(time.monotonic() - start)
                i += 1


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


def test_autoscaling_adds_a_model_replica_under_load_and_removes_it_after(ops_app):
    app = ops_app(
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 2,
        }
    )
    assert app.running_replicas() == 1
    timeline = [(0.0, 1)]  # (seconds since the load started, running model replicas) at each change

    def replicas_reach(count: int) -> Callable[[], bool]:
        def check() -> bool:
            running = app.running_replicas()
            if running != timeline[-1][1]:
                timeline.append((round(time.monotonic() - start, 1), running))
            return running == count

        return check

    start = time.monotonic()
    with ClosedLoad(app.url, clients=8) as load:
        scale_up_s = wait_for(replicas_reach(2), timeout_s=60)
        # Some more requests on two replicas; none may fail while the deployment scales.
        scaled_up_at = load.completed
        wait_for(lambda: load.completed >= scaled_up_at + 8, timeout_s=30)
    scale_down_s = wait_for(replicas_reach(1), timeout_s=90)
    print(f"\nautoscaling: up after {scale_up_s:.1f} s, down {scale_down_s:.1f} s after the load stopped")
    print(f"running model replicas over time (s, count): {timeline}")
    print(f"load outcomes: {dict(load.outcomes)}")
    assert set(load.outcomes) == {"audio"}, load.outcomes
    wait_for(app.is_healthy, timeout_s=10)  # the status leaves DOWNSCALING at Serve's next update


def test_redeploy_under_load_drops_no_request_in_flight(ops_app):
    # Long enough for an in-flight request to finish on the replica being replaced.
    shutdown = {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 15}
    app = ops_app(shutdown=shutdown)
    original = app.model_replica_actors()
    with ClosedLoad(app.url, clients=6) as load:
        wait_for(lambda: load.completed >= 6, timeout_s=60)
        before = load.completed
        # A new user_config; without a deployment `version`, each serve.run is also a new code version,
        # so Serve replaces every replica (ingress, model, stitcher) while requests are in flight.
        redeploy_start = time.monotonic()
        app.deploy(shutdown=shutdown, max_batch_size=6)
        redeploy_s = time.monotonic() - redeploy_start
        assert app.model_replica_actors().isdisjoint(original)
        during_redeploy = load.completed - before
        wait_for(lambda: load.completed >= before + during_redeploy + 6, timeout_s=60)
    print(
        f"\nredeploy under load: {dict(load.outcomes)}, {during_redeploy} of them completed during the "
        f"{redeploy_s:.1f} s serve.run; max latency {max(load.latencies):.1f} s"
    )
    assert set(load.outcomes) == {"audio"}, load.outcomes
    assert app.is_healthy()


def test_a_model_replica_killed_mid_load_loses_no_request_silently(ops_app):
    app = ops_app(autoscaling={"min_replicas": 2, "max_replicas": 2})
    replicas = app.model_replica_actors()
    assert len(replicas) == 2
    victim = sorted(replicas)[0]
    with ClosedLoad(app.url, clients=6) as load:
        wait_for(lambda: load.completed >= 6, timeout_s=60)
        before_kill = load.completed
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        # Healthy again: Serve noticed the death and a replacement replica is running beside the survivor.
        recovered_s = wait_for(
            lambda: (
                len(app.model_replica_actors() - replicas) == 1
                and app.model_status().replica_states == {"RUNNING": 2}
                and app.is_healthy()
            ),
            timeout_s=30,
        )
        after_recovery = load.completed
        wait_for(lambda: load.completed >= after_recovery + 6, timeout_s=60)
    print(
        f"\nreplica killed after {before_kill} requests: {dict(load.outcomes)}; healthy with 2 replicas "
        f"{recovered_s:.1f} s after the kill; max latency {max(load.latencies):.1f} s"
    )
    assert recovered_s < 30
    assert set(load.outcomes) <= {"audio", "refused"}, load.outcomes
    assert load.outcomes["audio"] >= before_kill + 6


def measure_capacity(url: str, clients: int, window_s: float) -> float:
    """Requests per second the app completes under a closed loop of `clients`, after a warm-up."""
    with ClosedLoad(url, clients=clients) as load:
        wait_for(lambda: load.completed >= clients, timeout_s=60)
        start, done_before = time.monotonic(), load.completed
        time.sleep(window_s)
        rate = (load.completed - done_before) / (time.monotonic() - start)
    assert set(load.outcomes) == {"audio"}, load.outcomes
    return rate


def latency_summary(latencies: dict[str, list[float]]) -> dict[str, str]:
    return {k: f"median {median(v):.2f}, max {max(v):.2f}" for k, v in latencies.items()}


@dataclass
class OpenLoadResult:
    outcomes: Counter[str]
    latencies: dict[str, list[float]]  # by outcome
    recovery_s: float  # from the last request sent to the first one answered with audio


async def open_load_then_recover(url: str, rate: float, duration_s: float) -> OpenLoadResult:
    """Requests sent at `rate` per second for `duration_s` whatever the answers (an open loop); then
    probes, one after another, until one gets audio."""
    outcomes: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {}

    async def post(client: httpx.AsyncClient, i: int) -> str:
        try:
            return outcome(await client.post(f"{url}/v1/tts", json=tts_body(i)))
        except httpx.HTTPError as error:
            return transport_failure(error)

    async def send(client: httpx.AsyncClient, i: int) -> None:
        start = time.monotonic()
        result = await post(client, i)
        outcomes[result] += 1
        latencies.setdefault(result, []).append(time.monotonic() - start)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start = time.monotonic()
        in_flight = []
        for i in range(round(rate * duration_s)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            in_flight.append(asyncio.create_task(send(client, i)))
        stopped = time.monotonic()
        probe = 0
        while (result := await post(client, 10**6 + probe)) != "audio":
            assert result == "refused", result
            probe += 1
            await asyncio.sleep(0.2)
        recovery_s = time.monotonic() - stopped
        await asyncio.gather(*in_flight)
    return OpenLoadResult(outcomes, latencies, recovery_s)


def test_overload_gets_audio_or_a_clean_refusal_and_recovers_at_once(ops_app):
    # Two batches' worth in progress per ingress; beyond that, a JSON 503 with Retry-After at once.
    app = ops_app(limits={"max_active_requests": 8})
    capacity = measure_capacity(app.url, clients=8, window_s=10)
    rate = min(2 * capacity, 40.0)  # bounded load whatever the machine
    result = asyncio.run(open_load_then_recover(app.url, rate, duration_s=30))
    print(
        f"\noverload: capacity {capacity:.2f} req/s, sent {rate:.2f} req/s for 30 s: "
        f"{dict(result.outcomes)}; latency (s) by outcome: {latency_summary(result.latencies)}; "
        f"first audio {result.recovery_s:.1f} s after the load stopped"
    )
    assert set(result.outcomes) == {"audio", "refused"}, result.outcomes
    assert median(result.latencies["refused"]) < 1.0  # a refusal comes at once, not after a wait in a queue
    assert result.recovery_s < 10
    assert app.is_healthy()
