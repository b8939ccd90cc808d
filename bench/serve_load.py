"""Bounded load test of the Serve graph on 127.0.0.1, against the engine called directly.

    python -m bench.serve_load                                   # tiny checkpoint on CPU
    python -m bench.serve_load --model ResembleAI/chatterbox-turbo --device cuda --max-new-tokens 1000

First the same request in-process (chunk, generate in batches of max_batch_size, stitch,
watermark, encode; the replica's torch threads), so the Serve path's overhead can be read off.
Then on a local Ray and app (one model replica), per concurrency level, `concurrency x rounds`
multi-chunk HTTP requests from that many clients (at least `--direct-runs` at concurrency 1),
stopping when the level's time budget runs out; and per `--stream-levels`, the request streamed
(`POST /v1/audio/speech`, pcm): time to first audio bytes beside total latency.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import statistics
import time
from dataclasses import dataclass

import httpx
import torch
from ray import serve

from bench.common import percentile
from bench.local_serve import local_serve
from chatterbox.hub import resolve_model
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from chatterbox.watermark import apply_watermark
from serve_app.api.openai import SERVED_MODEL_ID
from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.synthesis.audio import encode_audio, stitch, stitch_plan
from serve_app.synthesis.chunking import split_text

TEXT = (
    "The lighthouse keeper climbed the stairs before dawn, as she had every morning for thirty "
    "years. Gulls wheeled over the harbour, loud and hungry, and the fishing boats were already "
    "leaving. She wrote the weather in a small green notebook: wind from the west, light rain, "
    "visibility poor. Nobody had asked her to keep the notebook, but somebody should remember "
    "these things. By noon the fog had lifted from the bay, and the island across the water "
    "looked close enough to touch. She made tea, sat by the window, and waited for the evening "
    "ferry, which was late again, as it always was on Thursdays."
)


@dataclass
class Level:
    concurrency: int
    latencies: list[float]
    audio_s: float
    wall_s: float
    steps: int  # decode steps of the replica's engine
    tokens: int  # speech tokens it sampled


@dataclass
class StreamLevel:
    concurrency: int
    first_audio: list[float]  # seconds from sending to the first audio bytes
    latencies: list[float]  # seconds from sending to the last byte


def replica_torch_threads(model_num_cpus: float) -> int:
    """The intra-op threads a model replica gets: Ray sets OMP_NUM_THREADS to its CPUs, at least 1."""
    return max(math.floor(model_num_cpus), 1)


def time_direct(args: AppArgs, runs: int) -> tuple[float, float]:
    """Median seconds of one request done in-process (with the replica's thread count), and its
    audio seconds."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if use_cuda else "cpu"
    torch.set_num_threads(replica_torch_threads(args.model_num_cpus))
    checkpoint = resolve_model(args.model, args.revision, args.tiny_cache_dir)
    tts = TurboTTS.from_checkpoint(checkpoint, device, getattr(torch, args.dtype) if args.dtype else None)
    chunks = split_text(TEXT, args.chunking.max_chunk_chars, tts.max_text_tokens)
    plan = stitch_plan(chunks, args.stitching, tts.sample_rate, "wav")
    requests = [
        TTSRequest(text=c.text, sampling=SamplingParams(seed=i, max_new_tokens=args.max_new_tokens))
        for i, c in enumerate(chunks)
    ]
    times, audio_s = [], 0.0
    for run in range(runs + 1):  # the first run warms up
        start = time.perf_counter()
        wavs = []
        for first in range(0, len(requests), args.max_batch_size):
            wavs += tts.generate(requests[first : first + args.max_batch_size], watermark=False)
        wav = stitch(wavs, plan.pauses, plan.crossfade)
        if args.watermark:
            wav = apply_watermark(wav, tts.sample_rate)
        encode_audio(wav, tts.sample_rate, plan.format)
        if device == "cuda":
            torch.cuda.synchronize()
        if run > 0:
            times.append(time.perf_counter() - start)
        audio_s = len(wav) / tts.sample_rate
    del tts
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return statistics.median(times), audio_s


async def run_level(url: str, model, concurrency: int, rounds: int, budget_s: float) -> Level:
    before = await model.stats.remote()
    latencies: list[float] = []
    audio = [0.0]
    deadline = time.perf_counter() + budget_s

    async def client(client_id: int, http: httpx.AsyncClient) -> None:
        for r in range(rounds):
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            response = await http.post(
                f"{url}/v1/tts", json={"text": TEXT, "seed": client_id * rounds + r}, timeout=budget_s + 60
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            audio[0] += response.json()["duration_s"]

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    wall = time.perf_counter() - start
    after = await model.stats.remote()
    return Level(
        concurrency,
        latencies,
        audio[0],
        wall,
        after.engine.steps - before.engine.steps,
        after.engine.tokens_generated - before.engine.tokens_generated,
    )


async def run_stream_level(url: str, concurrency: int, rounds: int, budget_s: float) -> StreamLevel:
    level = StreamLevel(concurrency, [], [])
    deadline = time.perf_counter() + budget_s

    async def client(client_id: int, http: httpx.AsyncClient) -> None:
        for r in range(rounds):
            if time.perf_counter() > deadline:
                return
            body = {"model": SERVED_MODEL_ID, "input": TEXT, "response_format": "pcm"}
            start = time.perf_counter()
            first = None
            async with http.stream(
                "POST", f"{url}/v1/audio/speech", json={**body, "seed": client_id * rounds + r}
            ) as response:
                response.raise_for_status()
                async for part in response.aiter_bytes():
                    if first is None and part:
                        first = time.perf_counter() - start
            level.latencies.append(time.perf_counter() - start)
            level.first_audio.append(first if first is not None else float("nan"))

    timeout = httpx.Timeout(budget_s + 60)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=timeout) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help='"tiny", a checkpoint directory, or a HF repo id')
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-new-tokens", type=int, default=100, help="speech tokens per chunk at most")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--levels", default="1,8,32", help="comma-separated client concurrencies")
    parser.add_argument("--stream-levels", default="1,8", help="concurrencies of streamed requests")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--level-budget-s", type=float, default=60.0, help="stop sending after this long")
    parser.add_argument("--direct-runs", type=int, default=5)
    parser.add_argument(
        "--model-max-ongoing", type=int, default=None, help="chunks per replica at once (default: the app's)"
    )
    parser.add_argument("--no-watermark", action="store_true")
    cli = parser.parse_args()

    args = AppArgs(
        model=cli.model,
        device=cli.device,
        max_new_tokens=cli.max_new_tokens,
        max_batch_size=cli.max_batch_size,
        watermark=not cli.no_watermark,
        model_num_cpus=0,
        model_max_ongoing_requests=cli.model_max_ongoing,
        ingress={"num_cpus": 0, "max_ongoing_requests": 256},
        stitcher={"num_cpus": 0},
        shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
    )
    direct_s, direct_audio_s = time_direct(args, cli.direct_runs)

    levels: list[Level] = []
    stream_levels: list[StreamLevel] = []
    with local_serve() as port:
        serve.run(build_app(args), name="tts", route_prefix="/")
        model = serve.get_deployment_handle("TurboModel", "tts")
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/v1/tts", json={"text": TEXT}, timeout=600).raise_for_status()  # warm-up
        for concurrency in (int(c) for c in cli.levels.split(",")):
            # Serial requests are the overhead measurement: as many as the direct timing has.
            rounds = max(cli.rounds, cli.direct_runs) if concurrency == 1 else cli.rounds
            levels.append(asyncio.run(run_level(url, model, concurrency, rounds, cli.level_budget_s)))
        for concurrency in (int(c) for c in cli.stream_levels.split(",") if c):
            rounds = max(cli.rounds, cli.direct_runs) if concurrency == 1 else cli.rounds
            stream_levels.append(asyncio.run(run_stream_level(url, concurrency, rounds, cli.level_budget_s)))

    n_chunks = len(split_text(TEXT, args.chunking.max_chunk_chars))
    print(
        f"\nmodel={cli.model} device={cli.device} max_batch_size={cli.max_batch_size} "
        f"max_new_tokens={cli.max_new_tokens} watermark={args.watermark} "
        f"torch_threads={replica_torch_threads(args.model_num_cpus)}; "
        f"{len(TEXT)}-character text in {n_chunks} chunks ({direct_audio_s:.1f} s of audio)\n"
    )
    print(
        "| concurrency | requests | throughput (audio s/s) | p50 latency (s) | p95 latency (s) "
        "| mean live batch |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        mean_batch = level.tokens / level.steps if level.steps else float("nan")  # rows per step
        p50, p95 = percentile(level.latencies, 50), percentile(level.latencies, 95)
        print(
            f"| {level.concurrency} | {len(level.latencies)} | {level.audio_s / level.wall_s:.2f} | "
            f"{p50:.3f} | {p95:.3f} | {mean_batch:.2f} |"
        )
    print("\nStreamed (POST /v1/audio/speech, pcm):\n")
    print(
        "| concurrency | requests | first audio p50 (s) | first audio p95 (s) "
        "| latency p50 (s) | latency p95 (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for stream in stream_levels:
        print(
            f"| {stream.concurrency} | {len(stream.latencies)} | {percentile(stream.first_audio, 50):.3f} | "
            f"{percentile(stream.first_audio, 95):.3f} | {percentile(stream.latencies, 50):.3f} | "
            f"{percentile(stream.latencies, 95):.3f} |"
        )
    serve_p50 = percentile(levels[0].latencies, 50) if levels and levels[0].concurrency == 1 else float("nan")
    print(
        f"\nDirect engine, same request in-process: {direct_s:.3f} s (median of {cli.direct_runs}); "
        f"Serve at concurrency 1: {serve_p50:.3f} s; overhead {1000 * (serve_p50 - direct_s):.0f} ms "
        f"({100 * (serve_p50 / direct_s - 1):.1f} %)."
    )


if __name__ == "__main__":
    main()
