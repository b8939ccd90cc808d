"""T3 decoding throughput: our batched loop vs our loop one request at a time vs upstream's.

    python -m bench.t3                                          # Nano-size random T3, fp32, CPU
    python -m bench.t3 --size full --device cuda --dtype bf16   # Turbo size on a GPU

On one seeded random T3 (Nano or Turbo size): ``generate_tokens`` (the engine's DecodeBatch) at
each batch size, the same one request at a time, and upstream's ``T3.inference_turbo`` (fp32,
oracle venv, stop logit masked) one at a time on the same weights and device. Every row samples
``--tokens`` tokens (stop ignored), each side is warmed up first, and wall times include prefill.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import DTYPES, add_reference_args, hardware_name, timed
from chatterbox.constants import SPEECH_VOCAB_SIZE, TOKEN_HZ
from chatterbox.engine import generate_tokens
from chatterbox.sampling import SamplingParams
from chatterbox.t3 import T3, T3Request
from chatterbox.testing import SIZES, t3_state_dict
from reference.oracle import reference_available, run_reference


def make_requests(
    n: int,
    tokens: int,
    prompt_tokens: int,
    text_tokens: int,
    speaker_dim: int,
    text_vocab: int = 50276,
    seed: int = 0,
    **sampling: int,
) -> list[T3Request]:
    """n requests with their own voices and texts, each sampling exactly ``tokens`` tokens with the
    service defaults but for ``sampling`` (SamplingParams fields)."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(n):
        speaker = torch.rand(speaker_dim, generator=g)
        requests.append(
            T3Request(
                text_tokens=torch.randint(0, text_vocab, (text_tokens,), generator=g),
                speaker_emb=speaker / speaker.norm(),
                prompt_speech_tokens=torch.randint(0, SPEECH_VOCAB_SIZE, (prompt_tokens,), generator=g),
                sampling=SamplingParams(seed=i, max_new_tokens=tokens - 1, **sampling),
            )
        )
    return requests


def reference_sequential(
    t3_file: Path, requests: list[T3Request], tokens: int, threads: int, device: str
) -> tuple[float, int]:
    """Seconds and tokens of upstream's ``T3.inference_turbo`` on ``requests`` one at a time, each
    sampling ``tokens`` tokens (the oracle venv, on the same weights file)."""
    tensors = {}
    for i, r in enumerate(requests):
        tensors |= {
            f"{i}.speaker_emb": r.speaker_emb,
            f"{i}.prompt": r.prompt_speech_tokens,
            f"{i}.text": r.text_tokens,
        }
    _, ref = run_reference(
        "t3.timed_sequential",
        tensors,
        t3_file=str(t3_file),
        requests=len(requests),
        tokens=tokens,
        threads=threads,
        device=device,
    )
    return sum(ref["seconds"]), sum(ref["tokens"])


def timed_generate(model: T3, requests: list[T3Request]) -> tuple[float, int]:
    out: list[torch.Tensor] = []
    seconds = timed(
        lambda: out.extend(generate_tokens(model, requests, ignore_stop_token=True)), str(model.device)
    )
    return seconds, sum(t.numel() for t in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("nano", "full"), default="nano")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=250, help="tokens sampled per row, in every loop")
    parser.add_argument("--prompt-tokens", type=int, default=50, help="voice prompt speech tokens per row")
    parser.add_argument("--text-tokens", type=int, default=30)
    parser.add_argument("--baseline-requests", type=int, default=2, help="requests run one at a time")
    add_reference_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    dims = SIZES[args.size]

    began = time.perf_counter()
    state_dict = t3_state_dict(dims, 50276, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-t3-") as tmp:
        t3_file = Path(tmp) / "t3.safetensors"
        save_file(state_dict, t3_file)
        del state_dict
        model = T3.from_file(t3_file, device=args.device, dtype=DTYPES[args.dtype])
        requests = make_requests(
            max(batches), args.tokens, args.prompt_tokens, args.text_tokens, dims.speaker_dim
        )
        baseline = make_requests(
            args.baseline_requests, args.tokens, args.prompt_tokens, args.text_tokens, dims.speaker_dim
        )
        timed_generate(model, baseline[:1])  # warm-up

        rows = []  # (label, batch, requests, tokens per request, seconds, tokens)
        if not args.no_reference:
            if not reference_available():
                sys.exit("reference venv missing: set REF_VENV or pass --no-reference")
            seconds, tokens = reference_sequential(t3_file, baseline, args.tokens, args.threads, args.device)
            label = "upstream inference_turbo, 1 by 1"
            rows.append((label, 1, len(baseline), args.tokens, seconds, tokens))
        seconds = tokens = 0
        for request in baseline:
            s, n = timed_generate(model, [request])
            seconds, tokens = seconds + s, tokens + n
        rows.append(("ours, 1 by 1", 1, len(baseline), args.tokens, seconds, tokens))
        for batch in batches:
            s, n = timed_generate(model, requests[:batch])
            rows.append(("ours, batched", batch, batch, args.tokens, s, n))

    ref_rate = rows[0][5] / rows[0][4] if not args.no_reference else None
    ours_rate = next(n / s for label, *_, s, n in rows if label == "ours, 1 by 1")
    print(
        f"\nT3 {args.size} ({dims.t3_width}x{dims.t3_layers}), {args.dtype} on {args.device}"
        f" ({hardware_name(args.device)}, {args.threads} threads, {os.cpu_count()} cores),"
        f" prompt {args.prompt_tokens} + text {args.text_tokens} tokens per row, stop token ignored;"
        f" total run {time.perf_counter() - began:.0f} s\n"
    )
    print("| loop | batch | requests x tokens | wall s | tokens/s | audio s/s | x ours 1 by 1 | x upstream |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, batch, n_requests, per_request, s, n in rows:
        rate = n / s
        vs_ref = f"{rate / ref_rate:.2f}" if ref_rate else "-"
        print(
            f"| {label} | {batch} | {n_requests} x {per_request} | {s:.1f} | {rate:.1f}"
            f" | {rate / TOKEN_HZ:.2f} | {rate / ours_rate:.2f} | {vs_ref} |"
        )


if __name__ == "__main__":
    main()
