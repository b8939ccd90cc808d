"""Time to first audio: token-level (TurboEngine.stream_audio) vs chunk-level streaming, per first hop.

    python -m chatterbox.testing make-checkpoint /tmp/nano --size nano --seed 0
    python -m bench.streaming_ttfa --checkpoint /tmp/nano                 # CPU, levels 1 and 8
    python -m bench.streaming_ttfa --checkpoint DIR --device cuda         # levels 1, 8 and 32
    python -m bench.streaming_ttfa --checkpoint /tmp/nano --first-hops 4,8,16 --levels 1

The request is the first chunk the Serve ingress cuts from a long text. Chunk-level first audio is
``TurboEngine.submit`` of that chunk; token-level is the first hop of ``stream_audio``. Both run on
the same engine, request and seed, alternately, ``--repeats`` times. A random T3 rarely draws STOP,
so each request samples as many tokens as a voice speaks its text in (``--chars-per-second``).
``--first-hops`` times one engine per first hop side by side, then the seam error of each
(``bench.streaming_quality``). Then per first hop and concurrency level, that many streams
at once: first audio p50/p95, real-time factor (request to last piece over audio length), and
underruns: pieces arriving over 100 ms after all before them finished playing (vLLM-Omni's count).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import percentile
from bench.streaming_quality import StreamQuality, stream_and_measure
from chatterbox.constants import S3GEN_SR, TOKEN_HZ
from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.engine.config import DEFAULT_HOP_SCHEDULE
from chatterbox.hub import local_checkpoint
from chatterbox.s3gen.streaming import HopSchedule
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS

TEXT = (
    "The lighthouse keeper climbed the stairs before dawn, as she had every morning for thirty "
    "years. Gulls wheeled over the harbour, loud and hungry, and the fishing boats were already "
    "leaving. She wrote the weather in a small green notebook: wind from the west, light rain."
)
UNDERRUN_GAP_S = 0.1


@dataclass(frozen=True)
class StreamRun:
    first_audio_s: float  # request to first piece
    last_piece_s: float  # request to last piece
    audio_s: float
    underruns: int

    @property
    def rtf(self) -> float:
        return self.last_piece_s / self.audio_s


def underruns(arrivals: list[float], durations: list[float]) -> int:
    """Gaps over UNDERRUN_GAP_S for a listener who starts at the first piece and plays in order."""
    count, played_until = 0, arrivals[0]
    for arrival, duration in zip(arrivals, durations, strict=True):
        if arrival > played_until + UNDERRUN_GAP_S:
            count += 1
        played_until = max(played_until, arrival) + duration
    return count


async def token_stream(engine: TurboEngine, request: TTSRequest) -> StreamRun:
    start = time.perf_counter()
    arrivals, durations = [], []
    async for piece in engine.stream_audio(request):
        arrivals.append(time.perf_counter() - start)
        durations.append(len(piece) / S3GEN_SR)
    return StreamRun(arrivals[0], arrivals[-1], sum(durations), underruns(arrivals, durations))


async def chunk_level_first_audio(engine: TurboEngine, request: TTSRequest) -> float:
    start = time.perf_counter()
    await engine.submit(request)
    return time.perf_counter() - start


CONCURRENCY_HEADER = (
    "| first hop | concurrency | streams | first audio p50 (s) | first audio p95 (s) "
    "| stream RTF p50 | underruns (gaps > 100 ms) | streams with an underrun |\n"
    "|---|---|---|---|---|---|---|---|"
)


async def concurrency_row(engine: TurboEngine, level: int, request: Callable[[int], TTSRequest]) -> str:
    """``level`` token streams at once (seeds ``100 * level + i``): a CONCURRENCY_HEADER row."""
    runs = await asyncio.gather(*(token_stream(engine, request(100 * level + i)) for i in range(level)))
    first = [r.first_audio_s for r in runs]
    return (
        f"| {engine.config.hop_schedule.first_hop} | {level} | {len(runs)} | {percentile(first, 50):.2f} "
        f"| {percentile(first, 95):.2f} | {statistics.median(r.rtf for r in runs):.2f} "
        f"| {sum(r.underruns for r in runs)} | {sum(r.underruns > 0 for r in runs)} |"
    )


def first_hop_schedule(first_hop: int) -> HopSchedule:
    """The engine's default schedule with this first hop; a hop holds its overlap back, so the
    overlap is at most half the first hop's mel frames (2 per token)."""
    overlap = min(DEFAULT_HOP_SCHEDULE.overlap_frames, first_hop)
    return dataclasses.replace(DEFAULT_HOP_SCHEDULE, first_hop=first_hop, overlap_frames=overlap)


def seam_error(tts: TurboTTS, request: TTSRequest, schedule: HopSchedule) -> StreamQuality:
    """The request's tokens streamed with ``schedule`` against their full decode (same draws)."""
    job = tts.jobs([request])[0]
    return stream_and_measure(tts.s3gen, schedule, [job.s3gen_request(tts.speech_tokens([request])[0])])[0]


async def run(args: argparse.Namespace) -> None:
    # Here, not at the top: the GPU suite imports this module on a machine without the Serve stack.
    from serve_app.synthesis.chunking import split_text

    tts = TurboTTS.from_checkpoint(local_checkpoint(args.checkpoint), device=args.device)
    chunk = split_text(TEXT, args.max_chunk_chars, tts.max_text_tokens)[0].text
    tokens = args.max_new_tokens or math.ceil(TOKEN_HZ * len(chunk) / args.chars_per_second)
    levels = [int(level) for level in args.levels.split(",")] if args.levels else [1, 8]
    if args.device == "cuda" and not args.levels:
        levels.append(32)
    first_hops = [int(n) for n in args.first_hops.split(",")]
    engines = {
        n: TurboEngine(
            tts,
            EngineConfig(
                max_slots=max(levels), s3gen_max_batch=max(levels), hop_schedule=first_hop_schedule(n)
            ),
        )
        for n in first_hops
    }
    for engine in engines.values():
        engine.start()

    def request(seed: int) -> TTSRequest:
        return TTSRequest(chunk, sampling=SamplingParams(seed=seed, max_new_tokens=tokens))

    try:
        for engine in engines.values():
            await token_stream(engine, request(0))  # warm-up (allocator, kernels)
        print(
            f"{args.checkpoint.name} on {args.device}, {torch.get_num_threads()} torch threads; first chunk "
            f"of the text ({len(chunk)} chars, max_chunk_chars {args.max_chunk_chars}): {tokens} tokens "
            f"= {tokens / TOKEN_HZ:.1f} s of audio\n"
        )
        hops = " | ".join(f"token-level, first hop {n} (s)" for n in first_hops)
        print(f"| run | chunk-level first audio (s) | {hops} | ratio (first hop {first_hops[-1]}) |")
        print("|---" * (3 + len(first_hops)) + "|")
        ratios, firsts = [], {n: [] for n in first_hops}
        for k in range(args.repeats):
            chunk_s = await chunk_level_first_audio(engines[first_hops[-1]], request(1 + k))
            for n, engine in engines.items():
                firsts[n].append((await token_stream(engine, request(1 + k))).first_audio_s)
            ratios.append(chunk_s / firsts[first_hops[-1]][-1])
            cells = " | ".join(f"{firsts[n][-1]:.2f}" for n in first_hops)
            print(f"| {k + 1} | {chunk_s:.2f} | {cells} | {ratios[-1]:.1f}x |")
        print(f"\nmedian ratio {statistics.median(ratios):.1f}x\n")
        print(
            "| first hop (tokens) | overlap (frames) | first audio median (s) | first piece (s of audio) "
            "| seams | log-mel L1 | seam log-mel L1 | seam jump / full decode's |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for n in first_hops:
            schedule = first_hop_schedule(n)
            quality = seam_error(tts, request(1), schedule)
            piece_s = (2 * n - schedule.overlap_frames) * 0.02  # mel frames of 20 ms
            print(
                f"| {n} | {schedule.overlap_frames} | {statistics.median(firsts[n]):.2f} | {piece_s:.2f} "
                f"| {quality.seams} | {quality.mel_l1:.3f} | {quality.seam_mel_l1:.3f} "
                f"| {quality.seam_jump / quality.full_jump_at_seams:.2f} |"
            )
        print("\n" + CONCURRENCY_HEADER)
        for engine in engines.values():
            for level in levels:
                print(await concurrency_row(engine, level, request))
    finally:
        for engine in engines.values():
            engine.close()


def main(argv: list[str] | None = None) -> None:
    from serve_app.config import ChunkingConfig  # here for the reason in run

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (e.g. Nano)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", help="comma-separated concurrency levels (default 1,8; 1,8,32 on cuda)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-chunk-chars", type=int, default=ChunkingConfig().max_chunk_chars)
    parser.add_argument("--chars-per-second", type=float, default=15.0, help="speaking rate of the text")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per request (default: from the rate)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--first-hops",
        default=str(DEFAULT_HOP_SCHEDULE.first_hop),
        help="comma-separated first-hop sizes in tokens, timed side by side (e.g. 4,8,16)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
