"""Voice affinity: prefix-cache hit rate and latency with and without `voice_affinity`, side by side.

    python -m bench.affinity --requests 30 --rate 0.25          # tiny checkpoint on the CPU

Starts a local Ray and, per variant, an application with two model replicas (the tiny CPU profile)
whose caches hold `--voice-cache-size` voices each (`voice_cache_size`: prepared voices and the
engine's voice-prefix K/V), then sends the same seeded Poisson arrivals to it over HTTP: one-chunk
requests, each in one of 3x that many cloned voices drawn at random. Variants alternate
(off, on, on, off, ...) over `--rounds`, each on a fresh application, so background load hits
both alike. The hit rates are the replicas' own counters from Ray's metrics endpoint
(`chatterbox_prefix_cache_lookups`, `chatterbox_voice_cache_lookups`), read once every chunk sent
shows there. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from bench.common import free_port, percentile
from bench.local_serve import local_serve
from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.metrics import PREFIX_CACHE_LOOKUPS, VOICE_CACHE_LOOKUPS

# Ray exports each process's metrics this often (its default metrics_report_interval_ms), as
# `ray_<name>_total` for a counter.
EXPORT_INTERVAL_S = 10.0
SETTLE_TIMEOUT_S = 120.0
CLIP_SECONDS = 6.0  # a reference the service takes (5 s at least)
CLIP_SAMPLE_RATE = 16_000
TEXTS = [
    "The ferry was late again this morning.",
    "Please leave the parcel by the blue door.",
    "Rain is expected after lunch, so bring a coat.",
    "She counted the boats in the harbour twice.",
    "The meeting moved to the small room upstairs.",
]


@dataclass(frozen=True)
class Arrival:
    at_s: float  # since the run's start
    voice: int
    text: str


@dataclass
class Run:
    affinity: bool
    latencies: list[float]
    wall_s: float
    audio_s: float
    prefix: Counter[str]  # prefix-cache lookups by result (hit, miss), over both replicas
    voices: Counter[str]  # voice-cache lookups by result
    replicas: Counter[str]  # prefix-cache lookups (one per chunk) by replica

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix["hit"] / max(sum(self.prefix.values()), 1)

    @property
    def voice_hit_rate(self) -> float:
        return self.voices["hit"] / max(sum(self.voices.values()), 1)


def voice_clip(index: int) -> bytes:
    """A distinct voice-like WAV per index: a gliding harmonic tone, its pitch and rhythm by index."""
    t = np.arange(int(CLIP_SECONDS * CLIP_SAMPLE_RATE)) / CLIP_SAMPLE_RATE
    f0 = 110 + 9 * index + 25 * np.sin(2 * np.pi * (0.5 + 0.05 * index) * t)
    phase = 2 * np.pi * np.cumsum(f0) / CLIP_SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + 0.2 * index) * t) ** 2
    noise = 0.01 * np.random.default_rng(index).standard_normal(len(t))
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * tone * envelope + noise).astype(np.float32), CLIP_SAMPLE_RATE, format="WAV")
    return buffer.getvalue()


def poisson_arrivals(requests: int, rate: float, voices: int, seed: int) -> list[Arrival]:
    """`requests` arrivals at `rate` a second (exponential gaps), each in a voice drawn uniformly."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, requests))
    times -= times[0]  # the first request at once
    return [
        Arrival(float(at), int(rng.integers(voices)), TEXTS[i % len(TEXTS)]) for i, at in enumerate(times)
    ]


def app_counters(metrics_url: str, app: str) -> dict[str, Counter[str]]:
    """The prefix- and voice-cache lookups (by result) all replicas of `app` have exported, and the
    prefix-cache lookups by replica."""
    names = {f"ray_{PREFIX_CACHE_LOOKUPS}_total": "prefix", f"ray_{VOICE_CACHE_LOOKUPS}_total": "voices"}
    found: dict[str, Counter[str]] = {"prefix": Counter(), "voices": Counter(), "replicas": Counter()}
    text = httpx.get(metrics_url, timeout=10).raise_for_status().text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("application") == app:
                found[names[sample.name]][sample.labels["result"]] += int(sample.value)
                if names[sample.name] == "prefix":
                    found["replicas"][sample.labels["replica"]] += int(sample.value)
    return found


def settled_counters(metrics_url: str, app: str, chunks: int) -> dict[str, Counter[str]]:
    """`app_counters` once the prefix-cache lookups of `chunks` chunks (all sent so far) show, and one
    more export (the voice-cache counter comes from the same replicas but need not be in the same
    export)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while sum(app_counters(metrics_url, app)["prefix"].values()) < chunks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app}: the prefix-cache lookups of {chunks} chunks never showed")
        time.sleep(1.0)
    time.sleep(EXPORT_INTERVAL_S + 1.0)
    return app_counters(metrics_url, app)


async def send_arrivals(
    url: str, arrivals: list[Arrival], clips: list[str]
) -> tuple[list[float], float, int, float]:
    """Each arrival sent at its time; (latencies, wall seconds, chunks answered, audio seconds)."""
    latencies: list[float] = []
    chunks = [0]
    audio = [0.0]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def send(i: int, arrival: Arrival) -> None:
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            body = {"text": arrival.text, "reference_audio_base64": clips[arrival.voice], "seed": i}
            sent = time.perf_counter()
            response = (await client.post(f"{url}/v1/tts", json=body)).raise_for_status()
            latencies.append(time.perf_counter() - sent)
            result = response.json()
            chunks[0] += len(result["chunks"])
            audio[0] += result["duration_s"]

        await asyncio.gather(*(send(i, arrival) for i, arrival in enumerate(arrivals)))
        wall = time.perf_counter() - start
    return latencies, wall, chunks[0], audio[0]


def run_variant(
    cli: argparse.Namespace, affinity: bool, name: str, port: int, metrics_url: str, arrivals: list[Arrival]
) -> Run:
    args = AppArgs(
        model="tiny",
        tiny_cache_dir=cli.tiny_cache_dir,
        device="cpu",
        model_num_cpus=0,
        max_batch_size=cli.max_batch_size,
        max_new_tokens=cli.max_new_tokens,
        voice_cache_size=cli.voice_cache_size,
        voice_affinity=affinity,
        autoscaling={"min_replicas": cli.replicas, "max_replicas": cli.replicas},
        ingress={"num_cpus": 0},
        stitcher={"num_cpus": 0},
        shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
    )
    clips = [base64.b64encode(voice_clip(v)).decode() for v in range(cli.voice_cache_size * 3)]
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        url = f"http://127.0.0.1:{port}/{name}"
        # Warm the replicas up with the built-in voice (first calls load lazily). Its prefix is
        # cached too, so what the warm-up counted is taken off.
        warm_up = 2 * cli.replicas
        for _ in range(warm_up):
            httpx.post(f"{url}/v1/tts", json={"text": TEXTS[0]}, timeout=600).raise_for_status()
        before = settled_counters(metrics_url, name, warm_up)
        latencies, wall, chunks, audio = asyncio.run(send_arrivals(url, arrivals, clips))
        after = settled_counters(metrics_url, name, warm_up + chunks)
    finally:
        serve.delete(name)
    return Run(
        affinity,
        latencies,
        wall,
        audio,
        after["prefix"] - before["prefix"],
        after["voices"] - before["voices"],
        after["replicas"] - before["replicas"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rate", type=float, default=0.25, help="mean arrivals a second (Poisson)")
    parser.add_argument("--voice-cache-size", type=int, default=2, help="voices each replica caches")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=50, help="speech tokens per chunk at most")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, alternating the order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-cache-dir", default=AppArgs().tiny_cache_dir)
    cli = parser.parse_args()

    voices = 3 * cli.voice_cache_size
    arrivals = poisson_arrivals(cli.requests, cli.rate, voices, cli.seed)
    metrics_port = free_port()
    runs: list[Run] = []
    with local_serve(_metrics_export_port=metrics_port) as port:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        for round_ in range(cli.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for affinity in order:
                name = f"affinity-{'on' if affinity else 'off'}-{round_}"
                runs.append(run_variant(cli, affinity, name, port, metrics_url, arrivals))
                print(f"{name}: prefix {dict(runs[-1].prefix)}, voices {dict(runs[-1].voices)}", flush=True)

    print(
        f"\n{cli.replicas} model replicas (tiny, CPU, max_batch_size={cli.max_batch_size}, "
        f"max_new_tokens={cli.max_new_tokens}), voice_cache_size={cli.voice_cache_size}, {voices} voices; "
        f"{cli.requests} one-chunk requests, Poisson at {cli.rate}/s (seed {cli.seed}), "
        f"{cli.rounds} round(s) alternating\n"
    )
    print(
        "| voice affinity | round | requests | throughput (requests/s) | throughput (audio s/s) "
        "| prefix-cache hit rate | voice-cache hit rate | chunks per replica | p50 latency (s) "
        "| p95 latency (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, run in enumerate(runs):
        print(
            f"| {'on' if run.affinity else 'off'} | {i // 2} | {len(run.latencies)} "
            f"| {len(run.latencies) / run.wall_s:.3f} | {run.audio_s / run.wall_s:.2f} "
            f"| {run.prefix_hit_rate:.2f} ({run.prefix['hit']}/{sum(run.prefix.values())}) "
            f"| {run.voice_hit_rate:.2f} ({run.voices['hit']}/{sum(run.voices.values())}) "
            f"| {' / '.join(str(n) for n in sorted(run.replicas.values(), reverse=True))} "
            f"| {percentile(run.latencies, 50):.2f} | {percentile(run.latencies, 95):.2f} |"
        )
    for affinity in (False, True):
        side = [run for run in runs if run.affinity == affinity]
        latencies = [latency for run in side for latency in run.latencies]
        hits = sum(run.prefix["hit"] for run in side)
        lookups = sum(sum(run.prefix.values()) for run in side)
        print(
            f"\naffinity {'on' if affinity else 'off'}, all rounds: prefix-cache hit rate "
            f"{hits / max(lookups, 1):.2f}, p50 {percentile(latencies, 50):.2f} s, "
            f"p95 {percentile(latencies, 95):.2f} s",
            end="",
        )
    print()


if __name__ == "__main__":
    main()
