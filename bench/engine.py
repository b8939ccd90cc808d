"""End-to-end TTS throughput: our batched ``TurboTTS.generate`` vs upstream ``ChatterboxTurboTTS.generate``.

    python -m bench.engine                                         # Nano-size T3, fp32, CPU (~3.5 min)
    python -m bench.engine --size full --device cuda --dtype bf16 --tokens 250 \\
        --concurrency 1,8,32,64 --baseline-requests 4              # Turbo size, 10 s requests, GPU

Text in, watermarked 24 kHz audio out, built-in voice on both sides; every request samples exactly
``--tokens`` speech tokens (stop token ignored). On the same seeded weights and device: upstream
(fp32, oracle venv, stop logit masked) and ours one request at a time on ``--baseline-requests``
requests, then ours batched at each ``--concurrency``, each side warmed up first. Ours is timed as
``generate(watermark=False)`` plus the watermark of each output (what ``watermark=True`` does), so
one run gives both figures. ``--size nano`` puts a GPT-2 small T3 beside the Turbo-size rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from bench.common import DTYPES, add_model_args, add_reference_args, hardware_name, timed
from chatterbox.constants import S3GEN_SR, TOKEN_HZ
from chatterbox.hub import local_checkpoint, t3_weights_file
from chatterbox.sampling import SamplingParams
from chatterbox.testing import SIZES, make_checkpoint, t3_state_dict
from chatterbox.tts import TTSRequest, TurboTTS
from reference.oracle import reference_available, run_reference

TEXTS = (
    "The lighthouse keeper climbed the stairs before dawn, as she had every morning.",
    "Gulls wheeled over the harbour, loud and hungry, and the boats were already leaving.",
    "She wrote the weather in a small green notebook: wind from the west, light rain.",
    "By noon the fog had lifted, and the island looked close enough to touch.",
)


def checkpoint_dir(size: str, base: Path | None, tmp: Path) -> Path:
    """The checkpoint to run: a fresh tiny one for ``tiny``; ``base`` (a full-size directory; a fresh
    random one when None) for ``full``; for ``nano`` a directory linking base's files but its T3,
    plus a Nano T3."""
    if size == "tiny":
        return make_checkpoint(tmp / "tiny", "tiny", seed=0)
    if base is None:
        base = make_checkpoint(tmp / "full", "full", seed=0)
    if size == "full":
        return base
    nano = tmp / "nano"
    nano.mkdir()
    for file in base.iterdir():
        if file.name != "t3_turbo_v1.safetensors":
            (nano / file.name).symlink_to(file.resolve())
    save_file(t3_state_dict(SIZES["nano"], 50276, seed=0), nano / "t3_nano_v1.safetensors")
    return nano


def make_requests(n: int, tokens: int) -> list[TTSRequest]:
    return [
        TTSRequest(
            TEXTS[i % len(TEXTS)], sampling=SamplingParams(seed=i, max_new_tokens=tokens - 1)
        )  # + 1 from the prefill
        for i in range(n)
    ]


def timed_generate(tts: TurboTTS, requests: list[TTSRequest], device: str) -> tuple[float, float, float]:
    """Seconds of ``generate`` without watermark, seconds of watermarking its outputs, audio seconds."""
    wavs: list[np.ndarray] = []
    generate_s = timed(
        lambda: wavs.extend(tts.generate(requests, watermark=False, ignore_stop_token=True)), device
    )
    watermark_s = timed(lambda: [tts.watermark(wav) for wav in wavs], "cpu")
    return generate_s, watermark_s, sum(wav.size for wav in wavs) / S3GEN_SR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, ("nano", "full"))
    parser.add_argument("--concurrency", default="1,8,16", help="comma-separated batch sizes, ours")
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens per request (25 = 1 s)")
    parser.add_argument("--baseline-requests", type=int, default=2, help="requests run one at a time")
    add_reference_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    if not args.no_reference and not reference_available():
        sys.exit("reference venv missing: set REF_VENV or pass --no-reference")

    began = time.perf_counter()
    rows = []  # (loop, concurrency, requests, wall s, wall s without watermark or None, audio s)
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        ckpt_dir = checkpoint_dir(args.size, args.checkpoint, Path(tmp))
        baseline = make_requests(args.baseline_requests, args.tokens)
        if not args.no_reference:  # first, so its peak memory never adds to ours
            _, ref = run_reference(
                "engine.timed_generate",
                ckpt_dir=str(ckpt_dir),
                t3_file=str(t3_weights_file(ckpt_dir)),
                texts=[r.text for r in baseline],
                tokens=args.tokens,
                device=args.device,
                threads=args.threads,
            )
            audio = sum(ref["samples"]) / S3GEN_SR
            rows.append(("upstream, 1 by 1", 1, len(baseline), sum(ref["seconds"]), None, audio))

        tts = TurboTTS.from_checkpoint(
            local_checkpoint(ckpt_dir), device=args.device, dtype=DTYPES[args.dtype]
        )
        timed_generate(tts, baseline[:1], args.device)  # warm-up (also loads the watermarker)
        generate_s = watermark_s = audio = 0.0
        for request in baseline:
            g, w, a = timed_generate(tts, [request], args.device)
            generate_s, watermark_s, audio = generate_s + g, watermark_s + w, audio + a
        rows.append(("ours, 1 by 1", 1, len(baseline), generate_s + watermark_s, generate_s, audio))
        requests = make_requests(max(levels), args.tokens)
        for level in levels:
            g, w, a = timed_generate(tts, requests[:level], args.device)
            rows.append(("ours, batched", level, level, g + w, g, a))

    t3 = tts.t3.config.gpt2
    prompt = tts.default_voice.conditionals.prompt_tokens.numel()
    hardware = hardware_name(args.device)
    print(
        f"\nEnd-to-end TTS, {args.size} T3 ({t3.width}x{t3.layers}) + Turbo S3Gen, ours {args.dtype} / "
        f"upstream fp32 on {args.device} ({hardware}, {args.threads} threads, {os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}. Requests of {args.tokens} speech tokens "
        f"({args.tokens / TOKEN_HZ:g} s + 0.12 s silence), built-in voice, stop token ignored, "
        f"watermarked. S3Gen's flow also runs over the voice's {prompt}-token prompt, so short requests "
        "cost more per audio second than long ones. RTF = each request's latency / its audio length "
        f"(a batch's requests all finish with the batch). Total run {time.perf_counter() - began:.0f} s.\n"
        f"`python -m bench.engine {' '.join(sys.argv[1:])}`\n"
    )
    ref_rate = rows[0][5] / rows[0][3] if not args.no_reference else None
    print(
        "| loop | concurrency | requests x audio s | wall s | audio s/s | RTF "
        "| audio s/s, no watermark | x upstream |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for loop, concurrency, n, wall, unmarked, audio in rows:
        rate = audio / wall
        latency = wall / (n // concurrency)  # batches run one after another
        rtf = latency / (audio / n)
        no_mark = f"{audio / unmarked:.2f}" if unmarked is not None else "-"
        vs_ref = f"{rate / ref_rate:.2f}" if ref_rate else "-"
        print(
            f"| {loop} | {concurrency} | {n} x {audio / n:.2f} | {wall:.1f} | {rate:.2f} | {rtf:.2f}"
            f" | {no_mark} | {vs_ref} |"
        )


if __name__ == "__main__":
    main()
