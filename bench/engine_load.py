"""Serving under open-loop load: the static batcher the replica ran before vs ``TurboEngine``.

    python -m bench.engine_load                  # Nano-size T3 + Turbo S3Gen, fp32, CPU
    python -m bench.engine_load --quick          # tiny checkpoint, few short requests (CI dry run, < 2 min)
    python -m bench.engine_load --device cuda --size full --dtype bf16 --max-batch-size 32 --requests 96

Requests arrive as a seeded Poisson process (arrivals never wait for answers), each with its own
text, seed and ``--min-tokens``..``--max-tokens`` length (stop token ignored). Both engines serve
the same list at each rate (``--load``: fractions of the static batcher's capacity on full
batches): **static** runs ``TurboTTS.generate`` on up to ``--max-batch-size`` waiting requests
whenever the model is free; **engine** submits each request to ``TurboEngine`` as it arrives.
Reported: audio s/s, latency (arrival to audio) p50/p95/p99, queue wait p50 (to its batch's start
or engine slot) and the mean live batch (speech tokens per decode step).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import DTYPES, add_model_args, hardware_name
from bench.engine import TEXTS, checkpoint_dir
from chatterbox.constants import S3GEN_SR, TOKEN_HZ
from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.hub import local_checkpoint
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS

# --quick: a dry run of every code path (CI), < 2 min on a 2-core CPU.
QUICK = {"size": "tiny", "requests": 4, "min_tokens": 25, "max_tokens": 75, "max_batch_size": 4}


@dataclass(frozen=True)
class Arrival:
    at_s: float  # since the run's start
    tokens: int  # speech tokens it samples (stop token ignored)
    request: TTSRequest


@dataclass(frozen=True)
class Served:
    """One request's times, in seconds since the run's start, and its audio."""

    arrived_s: float
    started_s: float  # its batch started, or it got an engine slot
    finished_s: float
    audio_s: float


@dataclass(frozen=True)
class Run:
    served: list[Served]
    tokens: int  # speech tokens sampled
    steps: int  # T3 decode steps run


def draw_lengths(n: int, min_tokens: int, max_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Request lengths in tokens, and arrival gaps of a unit-rate Poisson process (divided by the
    rate later, so every rate serves the same requests in the same order)."""
    rng = np.random.default_rng(seed)
    return rng.integers(min_tokens, max_tokens + 1, size=n), rng.exponential(1.0, size=n)


def make_arrivals(lengths: np.ndarray, gaps: np.ndarray, rate_per_s: float) -> list[Arrival]:
    times = np.cumsum(gaps) / rate_per_s
    return [
        Arrival(
            float(at - times[0]),
            int(tokens),
            # max_new_tokens counts the tokens after the prefill's first one
            TTSRequest(
                TEXTS[i % len(TEXTS)], sampling=SamplingParams(seed=i, max_new_tokens=int(tokens) - 1)
            ),
        )
        for i, (at, tokens) in enumerate(zip(times, lengths, strict=True))
    ]


def audio_seconds(wav: np.ndarray) -> float:
    return wav.size / S3GEN_SR


async def run_static(tts: TurboTTS, arrivals: list[Arrival], max_batch_size: int) -> Run:
    """Whenever the model is free: up to max_batch_size waiting requests in one generate call."""
    start = time.monotonic()
    waiting: list[int] = []
    arrived = asyncio.Event()

    async def arrive() -> None:
        for i, arrival in enumerate(arrivals):
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.monotonic()))
            waiting.append(i)
            arrived.set()

    feeder = asyncio.create_task(arrive())
    served: dict[int, Served] = {}
    steps = 0
    while len(served) < len(arrivals):
        while not waiting:
            arrived.clear()
            await arrived.wait()
        batch, waiting[:] = waiting[:max_batch_size], waiting[max_batch_size:]
        started = time.monotonic() - start
        wavs = await asyncio.to_thread(
            tts.generate, [arrivals[i].request for i in batch], watermark=False, ignore_stop_token=True
        )
        finished = time.monotonic() - start
        # Decode steps after the prefill's draw; rows that reach their length leave the decode.
        steps += max(arrivals[i].tokens for i in batch) - 1
        for i, wav in zip(batch, wavs, strict=True):
            served[i] = Served(arrivals[i].at_s, started, finished, audio_seconds(wav))
    await feeder
    return Run([served[i] for i in range(len(arrivals))], sum(a.tokens for a in arrivals), steps)


async def run_engine(engine: TurboEngine, arrivals: list[Arrival], name: str) -> Run:
    """Every request submitted to the engine as it arrives."""
    before = engine.stats()
    start = time.monotonic()

    async def serve_one(i: int, arrival: Arrival) -> Served:
        await asyncio.sleep(max(0.0, start + arrival.at_s - time.monotonic()))
        request_id = f"{name}-{i}"
        wav = await engine.submit(arrival.request, request_id, ignore_stop_token=True)
        finished = time.monotonic() - start
        times = engine.stage_times(request_id)
        assert times is not None and times.admitted is not None
        admitted = times.admitted - start
        return Served(arrival.at_s, admitted, finished, audio_seconds(wav))

    served = await asyncio.gather(*(serve_one(i, a) for i, a in enumerate(arrivals)))
    after = engine.stats()
    return Run(list(served), after.tokens_generated - before.tokens_generated, after.steps - before.steps)


def progress(line: str) -> None:
    """A line on stderr as the run goes (a long run prints its table only at the end)."""
    print(line, file=sys.stderr, flush=True)


def row(engine: str, load: float, rate: float, run: Run) -> str:
    latency = np.array([s.finished_s - s.arrived_s for s in run.served])
    wait = np.array([s.started_s - s.arrived_s for s in run.served])
    wall = max(s.finished_s for s in run.served) - min(s.arrived_s for s in run.served)
    audio = sum(s.audio_s for s in run.served)
    p50, p95, p99 = np.percentile(latency, [50, 95, 99])
    return (
        f"| {engine} | {load:.0%} | {rate:.3f} | {len(run.served)} | {audio / wall:.2f} | {p50:.1f} "
        f"| {p95:.1f} | {p99:.1f} | {np.median(wait):.2f} | {run.tokens / run.steps:.1f} |"
    )


TABLE_HEADER = (
    "| engine | load | req/s | requests | audio s/s | latency p50 s | p95 s | p99 s "
    "| queue wait p50 s | mean live batch |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def load_rows(
    tts: TurboTTS, max_batch_size: int, loads: list[float], lengths: np.ndarray, gaps: np.ndarray
) -> tuple[float, list[str]]:
    """The static capacity (audio s/s), and a table row per engine and load (both warmed up first)."""
    engine = TurboEngine(tts, EngineConfig(max_slots=max_batch_size))
    engine.start()
    lines = []
    try:
        warm_up = make_arrivals(np.full(2, lengths.min()), gaps[:2], 1e9)
        asyncio.run(run_static(tts, warm_up, max_batch_size))
        asyncio.run(run_engine(engine, warm_up, "warm-up"))
        # Capacity: full static batches of requests drawn like the measured ones, all at once.
        full = make_arrivals(lengths[:max_batch_size], gaps[:max_batch_size], 1e9)
        capacity_run = asyncio.run(run_static(tts, full, max_batch_size))
        capacity = sum(s.audio_s for s in capacity_run.served) / max(
            s.finished_s for s in capacity_run.served
        )
        progress(f"static capacity {capacity:.2f} audio s/s")
        mean_audio_s = float(np.mean(lengths)) / TOKEN_HZ + 0.12  # + S3Gen's trailing silence
        for load in loads:
            rate = load * capacity / mean_audio_s  # requests per second
            arrivals = make_arrivals(lengths, gaps, rate)
            lines.append(row("static", load, rate, asyncio.run(run_static(tts, arrivals, max_batch_size))))
            progress(lines[-1])
            lines.append(row("engine", load, rate, asyncio.run(run_engine(engine, arrivals, f"load-{load}"))))
            progress(lines[-1])
    finally:
        engine.close()
    return capacity, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, ("tiny", "nano", "full"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-batch-size", type=int, default=8, help="static batch size = engine slots")
    parser.add_argument("--load", default="0.5,0.7,0.9", help="arrival rates, fractions of static capacity")
    parser.add_argument("--requests", type=int, default=24, help="requests per rate")
    parser.add_argument("--min-tokens", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a dry run: {', '.join(f'{k}={v}' for k, v in QUICK.items())} (< 2 min on CPU)",
    )
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    torch.set_num_threads(args.threads)
    lengths, gaps = draw_lengths(args.requests, args.min_tokens, args.max_tokens, args.seed)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-engine-load-") as tmp:
        ckpt_dir = checkpoint_dir(args.size, args.checkpoint, Path(tmp))
        tts = TurboTTS.from_checkpoint(
            local_checkpoint(ckpt_dir), device=args.device, dtype=DTYPES[args.dtype]
        )
        loads = [float(x) for x in args.load.split(",")]
        capacity, lines = load_rows(tts, args.max_batch_size, loads, lengths, gaps)
    t3 = tts.t3.config.gpt2
    print(
        f"\nOpen-loop Poisson load, {args.size} checkpoint (T3 {t3.width}x{t3.layers}), {args.dtype} on "
        f"{args.device} ({hardware_name(args.device)}, {args.threads} threads, {os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}. {args.requests} requests per rate of "
        f"{args.min_tokens}-{args.max_tokens} speech tokens (mean {np.mean(lengths) / TOKEN_HZ:.1f} s of "
        "audio), stop token ignored, no watermark; "
        f"static batches / engine slots: {args.max_batch_size}. Static capacity (full batches): "
        f"{capacity:.2f} audio s/s. Latency = arrival to audio; queue wait = arrival to batch start / engine "
        f"slot; live batch = speech tokens per decode step. Total run {time.monotonic() - began:.0f} s.\n"
        f"`python -m bench.engine_load {' '.join(sys.argv[1:])}`\n"
    )
    print(TABLE_HEADER)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
