"""Voice-prefix cache: prefill time with the voice's prefix cached vs computed, side by side.

    python -m bench.prefix_cache --checkpoint DIR   # Nano T3 + Turbo S3Gen, fp32, CPU (default)
    python -m bench.prefix_cache --size tiny        # dry run

The same requests (built-in voice, one new token each) through ``TurboEngine.stream``, one at a
time on an idle engine, alternating between an engine that keeps no prefixes and one whose warm-up
cached the voice's prefix. Measured from the engine's stage times: admission to first token.
Streaming skips S3Gen, so no vocoder work competes with the prefills.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import DTYPES, add_model_args, hardware_name
from bench.engine import TEXTS, checkpoint_dir
from chatterbox.engine import EngineConfig, TurboEngine
from chatterbox.hub import local_checkpoint
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS


async def prefill_seconds(engine: TurboEngine, text: str, request_id: str) -> float:
    """Admission to first token of one request alone on the engine."""
    request = TTSRequest(text, sampling=SamplingParams(seed=0, max_new_tokens=1))
    async for _ in engine.stream(request, request_id):
        pass
    times = engine.stage_times(request_id)
    assert times is not None and times.admitted is not None and times.first_token is not None
    return times.first_token - times.admitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, ("tiny", "nano", "full"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        ckpt_dir = checkpoint_dir(args.size, args.checkpoint, Path(tmp))
        tts = TurboTTS.from_checkpoint(
            local_checkpoint(ckpt_dir), device=args.device, dtype=DTYPES[args.dtype]
        )
        sides = {
            "prefix computed": TurboEngine(tts, EngineConfig(max_slots=1, prefix_cache_voices=0)),
            "prefix cached": TurboEngine(tts, EngineConfig(max_slots=1, prefix_cache_voices=1)),
        }
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for engine in sides.values():
            engine.start()
        try:
            for name, engine in sides.items():  # warm-up; it also stores the voice's prefix
                asyncio.run(prefill_seconds(engine, TEXTS[0], f"warm-up {name}"))
            for i in range(args.repeats):  # alternating, so drift on the machine hits both sides
                for name, engine in sides.items():
                    text = TEXTS[1 + i % (len(TEXTS) - 1)]
                    seconds[name].append(asyncio.run(prefill_seconds(engine, text, f"{name} {i}")))
        finally:
            for engine in sides.values():
                engine.close()

    t3 = tts.t3.config.gpt2
    prompt = tts.default_voice.conditionals.t3_prompt_tokens.numel()
    stats = {name: sides[name].stats() for name in sides}
    print(
        f"\nVoice-prefix cache, {args.size} T3 ({t3.width}x{t3.layers}), {args.dtype} on {args.device} "
        f"({hardware_name(args.device)}, {args.threads} threads, {os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}. Built-in voice: 1 speaker + {prompt} prompt positions; "
        f"{args.repeats} requests per side, one at a time, after one warm-up each.\n"
    )
    print("| prefill | prefix hits / misses | median s | min s | speed-up over computed |")
    print("|---|---:|---:|---:|---:|")
    baseline = statistics.median(seconds["prefix computed"])
    for name, values in seconds.items():
        median = statistics.median(values)
        hits, misses = stats[name].prefix_hits, stats[name].prefix_misses
        print(f"| {name} | {hits} / {misses} | {median:.3f} | {min(values):.3f} | {baseline / median:.2f} |")


if __name__ == "__main__":
    main()
