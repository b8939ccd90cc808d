"""A burst far beyond the shipped CPU profile's admission, on loopback: every answer is audio or our
JSON 503 with Retry-After (never Serve's plain-text refusal), and the service answers normally after."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs

PROFILE = Path(__file__).resolve().parents[2] / "configs" / "cpu-tiny.yaml"
APP = "burst"


def profile_args() -> dict:
    (application,) = yaml.safe_load(PROFILE.read_text())["applications"]
    return application["args"]


@pytest.fixture(scope="module")
def burst_url(serve_app) -> Iterator[str]:
    """The shipped CPU profile's application beside the session's (its CPU reservations fit the
    session's two CPUs); only the model cache and the shutdown delays are the test's."""
    args = AppArgs.model_validate(
        {
            **profile_args(),
            "tiny_cache_dir": serve_app.args.tiny_cache_dir,
            "shutdown": {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
        }
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{serve_app.url}/{APP}"
    finally:
        serve.delete(APP)


def burst_size() -> int:
    """4x what the profile lets into the ingress and its queue: `max_ongoing_requests` plus
    `max_queued_requests` (-1, no queue limit of Serve's: counted as `max_ongoing_requests` again)."""
    ingress = profile_args()["ingress"]
    queued = ingress["max_queued_requests"]
    return 4 * (ingress["max_ongoing_requests"] + (queued if queued > 0 else ingress["max_ongoing_requests"]))


async def send_burst(url: str, count: int) -> list[httpx.Response | BaseException]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        bodies = [{"text": f"Burst request {i}.", "format": "wav", "seed": i} for i in range(count)]
        return await asyncio.gather(
            *(client.post(f"{url}/v1/tts", json=body) for body in bodies), return_exceptions=True
        )


def test_a_burst_beyond_the_profiles_queue_gets_audio_or_our_json_503(burst_url):
    count = burst_size()
    assert count == 256  # the profile's 32 + 32, four times
    answers = asyncio.run(send_burst(burst_url, count))
    assert not [a for a in answers if isinstance(a, BaseException)]
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    for answer in answers:
        if answer.status_code == 200:
            assert len(base64.b64decode(answer.json()["audio_base64"])) > 44  # a WAV with samples
        else:
            assert answer.headers["content-type"] == "application/json", answer.text
            assert answer.json()["error"]["code"] == "overloaded", answer.text
            assert int(answer.headers["retry-after"]) >= 1
    print(f"\nburst of {count} on the CPU profile: {dict(statuses)}")
    after = httpx.post(f"{burst_url}/v1/tts", json={"text": "After the burst.", "format": "wav"}, timeout=120)
    assert after.status_code == 200, after.text
    assert len(base64.b64decode(after.json()["audio_base64"])) > 44
