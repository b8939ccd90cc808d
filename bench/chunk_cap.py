"""Chunks of one request in flight at once on a CPU replica (`max_chunks_in_flight`): latency under
Poisson load, and fairness to a short request behind a long one, per cap.

    python -m bench.chunk_cap                            # tiny CPU profile, caps 1, 2 and the slot count
    python -m bench.chunk_cap --requests 12 --rate 0.1   # fewer, sparser requests (a loaded machine)

Starts a local Ray (loopback) and one app per cap, side by side (`/cap1`, `/cap2`, ...), each as
`configs/cpu-tiny.yaml` has it: tiny checkpoint, one model replica with 1 CPU and `--max-batch-size`
slots. Per round:

- **solo**: a one-chunk request alone, median of `--solo-runs`;
- **behind long**: then the same request sent 0.3 s after a 40-paragraph (40-chunk) one; its
  latency over its solo latency is the fairness figure (the long request is then cancelled);
  these two run on each cap in turn, never two caps at once;
- **load**: a seeded Poisson arrival list (`--rate` req/s, `--requests` requests of 1-4 chunks),
  each arrival sent to every cap at the same moment, so background load (other jobs on a shared
  machine) hits each cap alike; audio s/s = audio of all its requests / first arrival to last
  answer, latency = send to answer.

The caps' replicas share the CPU while they serve the load, so `--rate` is per cap: the machine
sees `len(caps)` times it. Random weights rarely sample the stop token, so every chunk makes
`--max-new-tokens` tokens (100 = 4 s of audio) and the work per chunk is fixed. Prints one row per
round and cap as it goes, then one markdown table (rounds pooled: latencies together, audio over
wall summed, the medians of solo latency and of the fairness ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import statistics
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from bench.common import percentile
from bench.local_serve import local_serve
from serve_app.app import build_app
from serve_app.config import AppArgs

SENTENCES = (
    "The ferry left the harbour a little after six.",
    "Rain had been falling on the island since noon.",
    "She counted the boats and wrote the number down.",
    "Nobody on the pier seemed to be in any hurry.",
)
LONG_TEXT = "\n\n".join(f"Line {i} of a long script, read aloud slowly." for i in range(40))
SHORT_TEXT = "A short request, waiting its turn."
LONG_HEAD_START_S = 0.3  # the short request follows the long one by this much


@dataclass(frozen=True)
class Arrival:
    at_s: float  # since the load run's start
    text: str  # `chunks` paragraphs: one chunk each
    chunks: int
    seed: int


@dataclass
class CapResult:
    cap: int
    latencies: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    wall_s: float = 0.0
    fairness: list[float] = field(default_factory=list)  # behind-long latency / solo latency, per round
    solo: list[float] = field(default_factory=list)


def draw_arrivals(count: int, rate: float, seed: int) -> list[Arrival]:
    """A Poisson process at `rate` req/s of 1-4-chunk requests (paragraphs), seeded."""
    rng = np.random.default_rng(seed)
    starts = np.cumsum(rng.exponential(1.0 / rate, size=count))
    arrivals = []
    for i, at in enumerate(starts):
        chunks = int(rng.integers(1, 5))
        text = "\n\n".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(chunks))
        arrivals.append(Arrival(float(at - starts[0]), text, chunks, seed=i))
    return arrivals


async def post_tts(http: httpx.AsyncClient, url: str, text: str, seed: int) -> tuple[float, float]:
    """Seconds from sending to the whole answer, and the answer's audio seconds."""
    start = time.perf_counter()
    response = await http.post(f"{url}/v1/tts", json={"text": text, "seed": seed})
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["duration_s"]


async def wait_idle(model: DeploymentHandle, quiet_s: float = 5.0, timeout_s: float = 300.0) -> None:
    """Until the replica's engine holds no chunk and no chunk call came or went for `quiet_s` (a
    cancelled request's chunks have left it, and no next chunk of it is on its way)."""
    deadline = time.perf_counter() + timeout_s
    last, since = None, time.perf_counter()
    while time.perf_counter() < deadline:
        stats = await model.stats.remote()
        counts = (
            stats.chunks_received,
            stats.chunks_submitted,
            stats.chunks_finished,
            stats.chunks_cancelled,
        )
        if counts != last or stats.chunks_submitted != stats.chunks_finished + stats.chunks_cancelled:
            last, since = counts, time.perf_counter()
        elif time.perf_counter() - since >= quiet_s:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the replica did not go quiet")


async def solo_latency(http: httpx.AsyncClient, url: str) -> float:
    return (await post_tts(http, url, SHORT_TEXT, seed=1))[0]


async def behind_long(http: httpx.AsyncClient, url: str) -> float:
    """The short request's latency 0.3 s behind a 40-chunk one, which is then cancelled."""
    long = asyncio.create_task(post_tts(http, url, LONG_TEXT, seed=2))
    await asyncio.sleep(LONG_HEAD_START_S)
    latency, _ = await post_tts(http, url, SHORT_TEXT, seed=1)
    long.cancel()  # closes its connection: the ingress cancels its chunk calls
    with contextlib.suppress(asyncio.CancelledError):
        await long
    return latency


async def load(
    http: httpx.AsyncClient, url: str, arrivals: list[Arrival], start: float
) -> tuple[list[tuple[float, float]], float]:
    """Each arrival's latency and audio seconds, and the seconds from `start` to the last answer."""

    async def one(arrival: Arrival) -> tuple[float, float]:
        await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
        return await post_tts(http, url, arrival.text, arrival.seed)

    answers = await asyncio.gather(*(one(a) for a in arrivals))
    return answers, time.perf_counter() - start


async def measure_round(
    apps: dict[int, tuple[str, DeploymentHandle]],
    arrivals: list[Arrival],
    solo_runs: int,
    results: dict[int, CapResult],
) -> None:
    """One round: solo and behind-long on each cap in turn (never two at once: the ratio's two
    latencies see the same machine), then the load on all caps at once."""
    timeout, limits = httpx.Timeout(1800.0), httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        for cap, (url, model) in apps.items():
            solo = statistics.median([await solo_latency(http, url) for _ in range(solo_runs)])
            late = await behind_long(http, url)
            await wait_idle(model)
            results[cap].solo.append(solo)
            results[cap].fairness.append(late / solo)
        start = time.perf_counter()
        runs = await asyncio.gather(*(load(http, url, arrivals, start) for url, _ in apps.values()))
    for (cap, r), (answers, wall) in zip(results.items(), runs, strict=True):
        latencies = [latency for latency, _ in answers]
        r.latencies += latencies
        r.audio_s += sum(audio for _, audio in answers)
        r.wall_s += wall
        p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
        print(
            f"cap {cap}: latency p50 {p50:.2f} s, p95 {p95:.2f} s, solo {r.solo[-1]:.2f} s, "
            f"behind long / solo {r.fairness[-1]:.2f}x",
            flush=True,
        )


async def warm_up(apps: dict[int, tuple[str, DeploymentHandle]]) -> None:
    """A 4-chunk request through each app, in turn."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
        for url, _ in apps.values():
            await post_tts(http, url, "\n\n".join(SENTENCES), seed=0)


def app_args(cap: int, cli: argparse.Namespace) -> AppArgs:
    """configs/cpu-tiny.yaml's model replica, with `cap` chunks of a request in flight."""
    return AppArgs(
        model="tiny",
        device="cpu",
        model_num_cpus=1,
        max_batch_size=cli.max_batch_size,
        max_new_tokens=cli.max_new_tokens,
        max_chunks_in_flight=cap,
        limits={"max_active_requests": 24},
        ingress={"num_cpus": 0.25, "max_ongoing_requests": 32, "max_queued_requests": -1},
        stitcher={"num_cpus": 0.25},
        shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--caps", default=None, help="comma-separated caps (default: 1, 2, max batch size)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="engine slots (cpu-tiny: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="speech tokens per chunk (cpu-tiny)")
    parser.add_argument("--requests", type=int, default=24, help="requests per load run")
    parser.add_argument("--rate", type=float, default=0.4, help="Poisson arrivals per second, per cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="solo, behind-long and load runs per cap")
    parser.add_argument("--solo-runs", type=int, default=3)
    cli = parser.parse_args()
    caps = [int(c) for c in cli.caps.split(",")] if cli.caps else [1, 2, cli.max_batch_size]
    arrivals = draw_arrivals(cli.requests, cli.rate, cli.seed)
    results = {cap: CapResult(cap) for cap in caps}

    started = datetime.datetime.now(datetime.UTC)
    # A model replica and the front deployments per cap (accounting only).
    with local_serve(num_cpus=2 * len(caps)) as port:
        apps = {}
        for cap in caps:
            name = f"cap{cap}"
            serve.run(build_app(app_args(cap, cli)), name=name, route_prefix=f"/{name}")
            apps[cap] = (f"http://127.0.0.1:{port}/{name}", serve.get_deployment_handle("TurboModel", name))
        asyncio.run(warm_up(apps))
        for round_ in range(cli.rounds):
            print(f"round {round_}:", flush=True)
            asyncio.run(measure_round(apps, arrivals, cli.solo_runs, results))

    ended = datetime.datetime.now(datetime.UTC)
    chunks = [a.chunks for a in arrivals]
    print(
        f"\n{started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC. Tiny CPU profile: one model replica (1 CPU, "
        f"{cli.max_batch_size} slots, {cli.max_new_tokens} tokens per chunk); {cli.requests} requests of "
        f"1-4 chunks ({sum(chunks)} chunks) at {cli.rate} req/s per cap (Poisson, seed {cli.seed}), "
        f"{cli.rounds} round(s), all caps at once. Fairness: a one-chunk request {LONG_HEAD_START_S} s "
        "behind a 40-chunk one, its latency over its solo latency (median over rounds).\n"
    )
    print(
        f"| chunks in flight | requests | audio s/s | latency p50 (s) | p50 / cap {caps[0]}'s | p95 (s) "
        "| solo 1-chunk (s) | behind 40-chunk / solo |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    first_p50 = percentile(results[caps[0]].latencies, 50)
    for cap, r in results.items():
        p50 = percentile(r.latencies, 50)
        print(
            f"| {cap} | {len(r.latencies)} | {r.audio_s / r.wall_s:.2f} | {p50:.2f} | {p50 / first_p50:.2f}x "
            f"| {percentile(r.latencies, 95):.2f} | {statistics.median(r.solo):.2f} "
            f"| {statistics.median(r.fairness):.2f}x |"
        )


if __name__ == "__main__":
    main()
