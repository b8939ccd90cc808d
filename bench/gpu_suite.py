"""The CUDA path measured in one offline run (entry point: ``bench/gpu_suite.sh``).

    bash bench/gpu_suite.sh                          # one CUDA GPU, full-size seeded fixture, bf16
    bash bench/gpu_suite.sh --device cpu --size tiny # the CI dry run (CUDA-only parts noted)

On a seeded random checkpoint (random weights: speed and numerical error, not speech quality) it
writes ``results.json`` (after every section) and ``results.md`` into ``--out``: bf16 vs fp32 error
(T3 logits while both runs fed the same tokens, greedy agreement, flow mel, wave, HiFT under
autocast); ``DecodeBatch.step`` rates per ``--batches`` size, eager and as CUDA graphs; upstream's
fp32 batch-1 rate (full size, oracle venv only); time to first token, peak memory per slot
capacity and the batch-64 bandwidth bound; through ``TurboEngine``, streamed time to first audio
per concurrency (``bench.streaming_ttfa``) and Poisson load (``bench.engine_load``); last, S3Gen
eager vs compiled (``bench.s3gen``) at one batch size and length bucket, so the compile stays
bounded. chatterbox is imported inside functions, after the check for missing packages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.common import DTYPES, timed
from chatterbox.constants import SPEECH_VOCAB_SIZE

if TYPE_CHECKING:
    from chatterbox.engine import DecodeBatch
    from chatterbox.engine.cuda_graphs import GraphedDecodeStep
    from chatterbox.s3gen import S3Gen, S3GenRequest
    from chatterbox.t3 import T3Request

# What the suite imports beyond torch (the GPU machine has these, but not ray, librosa,
# soundfile or perth, which the suite never needs).
REQUIRED_PACKAGES = ("numpy", "safetensors", "tokenizers")
# What bf16 may cost against fp32, as relative RMS errors (bf16 keeps 8 bits of mantissa, ~0.4 %
# per rounding): T3's logits and the flow's mel, and the wave the bf16 flow gives through the fp32
# HiFT. The report marks each figure against its bound; tests/test_bf16_cpu.py holds the tiny
# checkpoint on the CPU to them.
# The sections no other section reads, in the order they run (the costliest last).
SKIPPABLE = ("reference_rate", "streaming", "engine_load", "s3gen_compile")
BF16_BOUNDS = {"t3_logits_rel_rms": 0.05, "flow_mel_rel_rms": 0.05, "wave_rel_rms": 0.1}


@dataclasses.dataclass(frozen=True)
class SizeProfile:
    """How big each measurement runs at a checkpoint size (tiny keeps the CPU dry run short)."""

    prompt_tokens: int  # voice prompt speech tokens per T3 row
    text_tokens: int
    cache_positions: int  # slot cache length of the decode benchmark
    decode_steps: int  # timed decode steps per batch size and mode
    greedy_steps: int  # bf16-vs-fp32 greedy agreement run
    s3gen_tokens: int  # speech tokens per S3Gen request in the precision check
    slot_capacities: tuple[int, ...]  # peak-memory probe
    compile_batch: int  # S3Gen eager vs compiled: one batch of s3gen_tokens-token requests
    stream_levels: tuple[int, ...]  # concurrent token streams through the engine
    stream_tokens: int  # speech tokens per stream
    load: tuple[int, int, int, int]  # Poisson load: requests, min and max tokens, engine slots


PROFILES = {
    "tiny": SizeProfile(20, 10, 160, 10, 100, 30, (4, 8), 2, (1, 2, 4), 20, (4, 25, 75, 4)),
    "nano": SizeProfile(375, 50, 1536, 50, 500, 150, (8, 32, 64), 16, (1, 16, 64), 150, (32, 50, 250, 32)),
    "full": SizeProfile(
        375, 50, 1536, 100, 500, 150, (8, 32, 64, 128), 16, (1, 16, 64), 150, (32, 50, 250, 32)
    ),
}


def missing_packages(hidden: set[str]) -> list[str]:
    return [name for name in REQUIRED_PACKAGES if name in hidden or importlib.util.find_spec(name) is None]


def hide_packages(names: set[str]) -> None:
    """Make ``import name`` fail from here on, as on a machine without the package."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's documented import block


def log(message: str) -> None:
    print(f"gpu_suite: {message}", file=sys.stderr, flush=True)


def errors(test: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max absolute error and the error's RMS relative to the reference's RMS."""
    diff = (test.float() - reference.float()).flatten()
    ref = reference.float().flatten()
    return {
        "max_abs": float(diff.abs().max()),
        "rel_rms": float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-12)),
    }


def decode_seconds(batch: DecodeBatch, requests: list[T3Request], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` ``DecodeBatch.step`` calls over ``requests`` (each forward + logits
    processing + sampling + the engine's one host sync), after their prefill and two warm-up steps."""
    rows = [batch.make_row(request, ignore_stop_token=True) for request in requests]
    for row in rows:
        batch.admit(row)
    while batch.waiting or batch.prefilling:
        batch.prefill()
    for _ in range(2):
        batch.step()
    seconds = timed(lambda: [batch.step() for _ in range(steps)], str(device))
    for row in rows:
        batch.cancel(row)
    return seconds


def graph_error(graphed: GraphedDecodeStep, slots: int, length: int, device: torch.device) -> float:
    """Max |replayed - eager| logits of the same static step, for live batches that fill a bucket
    and ones that leave padding rows (3 of 4, 5 of 8, ...)."""
    worst = 0.0
    for live in sorted({n for n in (1, 3, 5, slots // 2 + 1, slots) if n <= slots}):
        tokens = torch.arange(live, device=device) * 97 % SPEECH_VOCAB_SIZE
        lengths = length + torch.arange(live, device=device) % 7
        eager = graphed.step(tokens, lengths).clone()
        worst = max(worst, float((graphed(tokens, lengths) - eager).abs().max()))
    return worst


class Suite:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        """``workdir`` holds the fixture checkpoint (the reference loads its T3 file too)."""
        from chatterbox.hub import local_checkpoint, t3_weights_file
        from chatterbox.t3 import T3
        from chatterbox.testing import SIZES, make_checkpoint
        from chatterbox.tts import TurboTTS

        self.args = args
        self.device = torch.device(args.device)
        self.dims = SIZES[args.size]
        self.profile = PROFILES[args.size]
        self.results: dict[str, object] = {"section_s": {}}
        self.notes: list[str] = []
        begin = time.perf_counter()
        self.checkpoint = make_checkpoint(workdir, args.size, seed=args.seed)
        self.t3_file = t3_weights_file(self.checkpoint)
        self.tts = TurboTTS.from_checkpoint(
            local_checkpoint(self.checkpoint), self.device, DTYPES[args.dtype]
        )
        self.text_vocab = self.tts.t3.config.text_vocab
        other = "fp32" if args.dtype == "bf16" else "bf16"
        self.t3 = {args.dtype: self.tts.t3, other: T3.from_file(self.t3_file, self.device, DTYPES[other])}
        self.s3gen = {args.dtype: self.tts.s3gen, other: self.load_s3gen(DTYPES[other])}
        self.results["fixture_s"] = time.perf_counter() - begin

    def load_s3gen(self, dtype: torch.dtype) -> S3Gen:
        from chatterbox.s3gen import S3Gen

        return S3Gen.from_file(self.checkpoint / "s3gen_meanflow.safetensors", self.device, dtype)

    def t3_requests(self, n: int, new_tokens: int, greedy: bool) -> list[T3Request]:
        from bench.t3 import make_requests

        p, greedy_sampling = self.profile, {"top_k": 1} if greedy else {}
        size = (p.prompt_tokens, p.text_tokens, self.dims.speaker_dim, self.text_vocab)
        return make_requests(n, new_tokens + 1, *size, self.args.seed, **greedy_sampling)

    def s3gen_requests(self, n: int) -> list[S3GenRequest]:
        from bench.s3gen import make_inputs, requests_from

        return requests_from(make_inputs(n, self.profile.s3gen_tokens, self.profile.prompt_tokens), n)

    def precision(self) -> None:
        from chatterbox.engine import generate_tokens

        steps = self.profile.greedy_steps
        requests = self.t3_requests(4, steps - 1, greedy=True)  # steps tokens per row
        runs = {}
        for name, model in self.t3.items():
            logits: list[torch.Tensor] = []
            hook = model.speech_head.register_forward_hook(lambda _m, _i, out, keep=logits: keep.append(out))
            try:
                tokens = generate_tokens(model, requests, ignore_stop_token=True)
            finally:
                hook.remove()
            runs[name] = (tokens, logits)
        (ref_tokens, ref_logits), (bf_tokens, bf_logits) = runs["fp32"], runs["bf16"]
        agree = [(a == b).float().mean().item() for a, b in zip(ref_tokens, bf_tokens, strict=True)]
        first_split = [
            int((a != b).nonzero()[0, 0]) if (a != b).any() else a.numel()
            for a, b in zip(ref_tokens, bf_tokens, strict=True)
        ]
        # Logits compare while every row has fed both models the same tokens (the first calls are
        # the prefills: two per row, its voice prefix and the rest).
        shared = 2 * len(requests) + min(first_split)
        logit_errors = [errors(b, a) for a, b in zip(ref_logits[:shared], bf_logits[:shared], strict=True)]
        self.results["t3_bf16"] = {
            "greedy_steps": steps,
            "rows": len(requests),
            "token_agreement": sum(agree) / len(agree),
            "token_agreement_per_row": agree,
            "first_disagreement_per_row": first_split,
            "logits_compared_steps": shared,
            "logits_max_abs": max(e["max_abs"] for e in logit_errors),
            "logits_rel_rms": max(e["rel_rms"] for e in logit_errors),
        }

        s3_requests = self.s3gen_requests(2)
        reference = self.s3gen["fp32"]
        noise = reference.noise_for(s3_requests)
        ref_mels = reference.mels(s3_requests, noise)
        bf_mels = self.s3gen["bf16"].mels(s3_requests, noise)
        mel_errors = [errors(b, a) for a, b in zip(ref_mels, bf_mels, strict=True)]
        ref_wavs = reference.vocode(ref_mels, noise)
        # What CUDA serves: the bf16 flow's mels through the fp32 HiFT.
        served = self.s3gen["bf16"].vocode(bf_mels, noise)
        self.results["s3gen_bf16_flow"] = {
            "flow_mel_max_abs": max(e["max_abs"] for e in mel_errors),
            "flow_mel_rel_rms": max(e["rel_rms"] for e in mel_errors),
            "wave_max_abs": max(errors(b, a)["max_abs"] for a, b in zip(ref_wavs, served, strict=True)),
            "wave_rel_rms": max(errors(b, a)["rel_rms"] for a, b in zip(ref_wavs, served, strict=True)),
        }
        # HiFT's own error in reduced precision, on the fp32 mels.
        hift: dict[str, object] = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            try:
                with torch.autocast(self.device.type, dtype=dtype):
                    wavs = reference.vocode(ref_mels, noise)
            except RuntimeError as error:  # e.g. torch.complex has no bfloat16
                hift[name] = f"does not run: {str(error).splitlines()[0]}"
                continue
            wave_errors = [errors(b, a) for a, b in zip(ref_wavs, wavs, strict=True)]
            hift[name] = {
                "wave_max_abs": max(e["max_abs"] for e in wave_errors),
                "wave_rel_rms": max(e["rel_rms"] for e in wave_errors),
            }
        self.results["hift_autocast"] = hift

    def decode(self) -> None:
        from chatterbox.engine import DecodeBatch
        from chatterbox.engine.kv_cache import SlotCache
        from chatterbox.t3 import T3

        model = self.t3[self.args.dtype]
        dtype = model.speech_emb.weight.dtype
        batches = [int(b) for b in self.args.batches.split(",")]
        slots, positions, steps = max(batches), self.profile.cache_positions, self.profile.decode_steps
        requests = self.t3_requests(slots, steps + 2, greedy=False)  # the sampling defaults
        start_length = T3.prefill_len(requests[0]) + 1  # each row's length at the first timed step
        modes = {"eager": DecodeBatch(model, slots, positions)}
        if self.device.type == "cuda":
            graphed = DecodeBatch(model, slots, positions, cuda_graphs=True)
            self.results["graph_capture_s"] = graphed.graphed_decode.capture_s
            self.results["graph_vs_eager_max_abs"] = graph_error(
                graphed.graphed_decode, slots, start_length, self.device
            )
            self.results["graph_buckets"] = list(graphed.graphed_decode.buckets)
            modes["cuda_graphs"] = graphed
        else:
            self.notes.append("CUDA graphs skipped: no CUDA device (decode measured eager only).")
        rows: list[dict[str, object]] = []
        for batch in batches:
            for mode, decode in modes.items():
                seconds = decode_seconds(decode, requests[:batch], steps, self.device)
                steps_per_s = steps / seconds
                rows.append(
                    {
                        "batch": batch,
                        "mode": mode,
                        "steps_per_s": steps_per_s,
                        "tokens_per_s": steps_per_s * batch,
                    }
                )
        del modes
        self.results["decode"] = rows
        self.results["decode_setup"] = {
            "dtype": self.args.dtype,
            "cache_positions": positions,
            "row_length_at_start": start_length,
            "steps": steps,
            "includes": "DecodeBatch.step: forward + logits processing + sampling + one host sync",
        }
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.results["t3_weight_bytes"] = weight_bytes
        self.results["kv_bytes_per_position"] = SlotCache.nbytes_for(model.config.gpt2, 1, 1, dtype)

    def bandwidth(self) -> None:
        """Device copy bandwidth, and the steps/s a batch-64 step could reach if it only read weights
        and KV cache at that bandwidth (eager attention reads each row's live length)."""
        if self.device.type != "cuda":
            self.notes.append("Bandwidth bound skipped: no CUDA device.")
            return
        source = torch.empty(1 << 30, dtype=torch.uint8, device=self.device)
        target = torch.empty_like(source)
        target.copy_(source)
        seconds = timed(lambda: [target.copy_(source) for _ in range(10)], str(self.device))
        bandwidth = 2 * source.numel() * 10 / seconds  # read + write
        setup = self.results["decode_setup"]
        kv_read = 64 * (setup["row_length_at_start"] + self.profile.decode_steps // 2)  # type: ignore[index]
        step_bytes = self.results["t3_weight_bytes"] + kv_read * self.results["kv_bytes_per_position"]
        bound = bandwidth / step_bytes
        best = max(
            (r["steps_per_s"] for r in self.results["decode"] if r["batch"] == 64),  # type: ignore[index, union-attr]
            default=None,
        )
        self.results["bandwidth"] = {
            "copy_GBps": bandwidth / 1e9,
            "batch64_step_bytes": step_bytes,
            "batch64_bound_steps_per_s": bound,
            "batch64_fraction_of_bound": best / bound if best else None,
        }

    def first_token(self) -> None:
        """Prefill + first draw for one request (generate_tokens with one new token: 2 draws)."""
        from chatterbox.engine import generate_tokens

        model = self.t3[self.args.dtype]
        request = self.t3_requests(1, 1, greedy=False)
        generate_tokens(model, request, ignore_stop_token=True)  # warm-up
        samples = sorted(
            timed(lambda: generate_tokens(model, request, ignore_stop_token=True), str(self.device))
            for _ in range(5)
        )
        self.results["time_to_first_token_s"] = {
            "median": samples[2],
            "prompt_tokens": self.profile.prompt_tokens,
            "text_tokens": self.profile.text_tokens,
            "note": "prefill + first draw + one decode step (generate_tokens, max_new_tokens=1)",
        }

    def memory(self) -> None:
        from chatterbox.engine.cuda_graphs import static_slot_step
        from chatterbox.engine.kv_cache import SlotCache

        if self.device.type != "cuda":
            self.notes.append("Peak GPU memory skipped: no CUDA device (KV bytes per slot computed).")
            return
        model = self.t3[self.args.dtype]
        dtype = model.speech_emb.weight.dtype
        positions = self.profile.cache_positions
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        rows = []
        for capacity in self.profile.slot_capacities:
            torch.cuda.reset_peak_memory_stats()
            cache = SlotCache(model.config.gpt2, capacity, positions, dtype, self.device)
            lengths = torch.full((capacity,), positions - 1, device=self.device)
            tokens = torch.zeros(capacity, dtype=torch.long, device=self.device)
            static_slot_step(model, cache)(tokens, lengths)
            peak = torch.cuda.max_memory_allocated() - base
            rows.append(
                {
                    "slots": capacity,
                    "positions": positions,
                    "peak_bytes_over_weights": peak,
                    "peak_bytes_per_slot": peak / capacity,
                    "kv_bytes_per_slot": cache.nbytes / capacity,
                }
            )
            del cache
            torch.cuda.empty_cache()
        self.results["memory"] = rows
        self.results["weights_bytes_allocated"] = base

    def reference_rate(self) -> None:
        from bench.t3 import reference_sequential
        from reference.oracle import reference_available

        if not reference_available():
            self.notes.append("Reference fp32 batch-1 rate skipped: no reference venv (reference/setup.sh).")
            return
        if self.args.size != "full":  # upstream's T3 has the full size built in
            self.notes.append(
                f"Reference fp32 batch-1 rate skipped: upstream T3 is full-size only, not {self.args.size}."
            )
            return
        seconds, tokens = reference_sequential(
            self.t3_file, self.t3_requests(1, 1, greedy=False), 200, torch.get_num_threads(), self.args.device
        )
        self.results["reference_fp32_batch1_tokens_per_s"] = tokens / seconds

    def streaming(self) -> None:
        """Concurrent token streams through one engine (default hop schedule), after a warm-up."""
        from bench.streaming_ttfa import CONCURRENCY_HEADER, TEXT, concurrency_row, token_stream
        from chatterbox.engine import EngineConfig, TurboEngine
        from chatterbox.sampling import SamplingParams
        from chatterbox.tts import TTSRequest

        levels, tokens = self.profile.stream_levels, self.profile.stream_tokens
        engine = TurboEngine(self.tts, EngineConfig(max_slots=max(levels), s3gen_max_batch=max(levels)))

        def request(seed: int) -> TTSRequest:
            return TTSRequest(TEXT, sampling=SamplingParams(seed=seed, max_new_tokens=tokens))

        async def rows() -> list[str]:
            await token_stream(engine, request(0))
            return [await concurrency_row(engine, level, request) for level in levels]

        engine.start()
        try:
            self.results["streaming"] = {
                "tokens": tokens,
                "table": [CONCURRENCY_HEADER, *asyncio.run(rows())],
            }
        finally:
            engine.close()

    def engine_load(self) -> None:
        """Open-loop Poisson arrivals at 90 % of the static batcher's capacity, static vs engine."""
        from bench.engine_load import TABLE_HEADER, draw_lengths, load_rows

        requests, min_tokens, max_tokens, slots = self.profile.load
        lengths, gaps = draw_lengths(requests, min_tokens, max_tokens, self.args.seed)
        capacity, rows = load_rows(self.tts, slots, [0.9], lengths, gaps)
        self.results["engine_load"] = {
            "setup": f"{requests} requests of {min_tokens}-{max_tokens} tokens, {slots} slots / static batch",
            "static_capacity_audio_s_per_s": capacity,
            "table": [TABLE_HEADER, *rows],
        }

    def s3gen_compile(self) -> None:
        """One batch through the eager S3Gen and a compiled copy, compiled for that shape alone."""
        from bench.s3gen import compare_compiled

        batch, args = self.profile.compile_batch, self.args
        settings = argparse.Namespace(
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            tokens=self.profile.s3gen_tokens,
            prompt_tokens=self.profile.prompt_tokens,
            repeats=2,
        )
        compiled = self.load_s3gen(DTYPES[args.dtype])
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            compare_compiled(settings, self.tts.s3gen, compiled, self.s3gen_requests(batch), [batch])
        self.results["s3gen_compile"] = table.getvalue().strip()

    def environment(self) -> None:
        self.results["environment"] = {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "size": self.args.size,
            "dtype": self.args.dtype,
            "seed": self.args.seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def write(self, out: Path, seconds: float) -> None:
        self.results["suite_s"] = seconds
        self.results["notes"] = self.notes
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.results, indent=2))


def bf16_errors(r: dict) -> dict[str, float]:
    """The figures of ``precision`` that BF16_BOUNDS bounds, by the bounds' names."""
    t3, s3 = r["t3_bf16"], r["s3gen_bf16_flow"]
    return {
        "t3_logits_rel_rms": t3["logits_rel_rms"],
        "flow_mel_rel_rms": s3["flow_mel_rel_rms"],
        "wave_rel_rms": s3["wave_rel_rms"],
    }


def _bound(r: dict, name: str) -> str:
    verdict = "within" if bf16_errors(r)[name] <= BF16_BOUNDS[name] else "**over**"
    return f"({verdict} bound {BF16_BOUNDS[name]:g})"


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [
        f"# GPU suite: {env['device']}, {env['size']} checkpoint, T3 {env['dtype']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), {env['date']}, suite {r['suite_s']:.0f} s"
        f" (fixture {r['fixture_s']:.0f} s). Random seeded weights.",
        "",
        "## bf16 vs fp32",
        "",
        "| quantity | value |",
        "|---|---:|",
    ]
    t3, s3 = r["t3_bf16"], r["s3gen_bf16_flow"]
    lines += [
        f"| T3 greedy token agreement ({t3['rows']} rows x {t3['greedy_steps']} steps) |"
        f" {t3['token_agreement']:.3f} |",
        f"| T3 first disagreement per row (step) | {t3['first_disagreement_per_row']} |",
        f"| T3 logits max abs / rel RMS (first {t3['logits_compared_steps']} steps) |"
        f" {t3['logits_max_abs']:.3g} / {t3['logits_rel_rms']:.3g} {_bound(r, 't3_logits_rel_rms')} |",
        f"| flow mel max abs / rel RMS | {s3['flow_mel_max_abs']:.3g} / {s3['flow_mel_rel_rms']:.3g}"
        f" {_bound(r, 'flow_mel_rel_rms')} |",
        f"| wave from the bf16 flow, fp32 HiFT: max abs / rel RMS | {s3['wave_max_abs']:.3g} /"
        f" {s3['wave_rel_rms']:.3g} {_bound(r, 'wave_rel_rms')} |",
    ]
    for name, value in r["hift_autocast"].items():
        shown = (
            value if isinstance(value, str) else f"{value['wave_max_abs']:.3g} / {value['wave_rel_rms']:.3g}"
        )
        lines.append(f"| HiFT alone under {name} autocast: max abs / rel RMS | {shown} |")
    lines += [
        "",
        "## T3 decode",
        "",
    ]
    setup = r["decode_setup"]
    lines += [
        f"{setup['dtype']}, rows start at {setup['row_length_at_start']} positions, cache"
        f" {setup['cache_positions']} positions, {setup['steps']} timed steps ({setup['includes']}).",
    ]
    if "graph_capture_s" in r:
        lines.append(
            f"CUDA graph capture: {r['graph_capture_s']:.2f} s for buckets {r['graph_buckets']}; replayed"
            f" logits vs the same step eager: max abs {r['graph_vs_eager_max_abs']:.2g}."
        )
    ref = r.get("reference_fp32_batch1_tokens_per_s")
    lines += [
        "",
        "| batch | mode | steps/s | tokens/s | x reference fp32 batch 1 |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in r["decode"]:
        vs = f"{row['tokens_per_s'] / ref:.1f}" if ref else "-"
        lines.append(
            f"| {row['batch']} | {row['mode']} | {row['steps_per_s']:.1f} | {row['tokens_per_s']:.0f}"
            f" | {vs} |"
        )
    if ref:
        lines.append(f"\nReference fp32 batch 1: {ref:.1f} tokens/s.")
    ttft = r["time_to_first_token_s"]
    lines += [
        "",
        f"Time to first token: {1000 * ttft['median']:.1f} ms ({ttft['prompt_tokens']} prompt +"
        f" {ttft['text_tokens']} text tokens; {ttft['note']}).",
    ]
    if "bandwidth" in r:
        bw = r["bandwidth"]
        fraction = bw["batch64_fraction_of_bound"]
        lines.append(
            f"Copy bandwidth {bw['copy_GBps']:.0f} GB/s: a batch-64 step reading"
            f" {bw['batch64_step_bytes'] / 1e9:.2f} GB is bound at {bw['batch64_bound_steps_per_s']:.0f}"
            f" steps/s; reached {'-' if fraction is None else f'{fraction:.0%}'}."
        )
    lines += ["", f"KV cache: {r['kv_bytes_per_position'] / 1024:.0f} KiB per position ({setup['dtype']})."]
    if "memory" in r:
        lines += [
            "",
            "## Peak GPU memory per slot capacity",
            "",
            f"Weights allocated: {r['weights_bytes_allocated'] / 1e9:.2f} GB (T3 and S3Gen in both"
            " precisions, the voice conditioner).",
            "",
            "| slots | positions | peak over weights GB | per slot MB | KV per slot MB |",
            "|---:|---:|---:|---:|---:|",
        ]
        for m in r["memory"]:
            lines.append(
                f"| {m['slots']} | {m['positions']} | {m['peak_bytes_over_weights'] / 1e9:.2f} |"
                f" {m['peak_bytes_per_slot'] / 1e6:.0f} | {m['kv_bytes_per_slot'] / 1e6:.0f} |"
            )
    if "streaming" in r:
        lines += ["", f"## Streamed time to first audio ({r['streaming']['tokens']} tokens a stream)", ""]
        lines += r["streaming"]["table"]
    if "engine_load" in r:
        load = r["engine_load"]
        lines += ["", f"## Poisson load ({load['setup']})", ""]
        lines += [
            f"Static capacity: {load['static_capacity_audio_s_per_s']:.2f} audio s/s.",
            "",
            *load["table"],
        ]
    if "s3gen_compile" in r:
        lines += ["", "## S3Gen eager vs compiled", "", r["s3gen_compile"]]
    sections = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in r["section_s"].items())
    lines += ["", f"Section times: {sections}."]
    if r["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in r["notes"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(PROFILES), default="full")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="T3 precision for speed")
    parser.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more than free cores stalls every op)"
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated sections not to run, of {', '.join(SKIPPABLE)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a new temp folder)")
    parser.add_argument(
        "--hide-packages",
        default="",
        help="comma-separated modules to treat as not installed (the CI dry run hides what the GPU "
        "machine lacks: ray,librosa,soundfile,perth)",
    )
    args = parser.parse_args()
    skipped = {name for name in args.skip.split(",") if name}
    if skipped - set(SKIPPABLE):
        parser.error(f"--skip takes {', '.join(SKIPPABLE)}; got {args.skip}")
    hidden = {name for name in args.hide_packages.split(",") if name}
    missing = missing_packages(hidden)
    if missing:
        sys.exit(
            f"bench/gpu_suite.py needs {', '.join(REQUIRED_PACKAGES)} beyond torch; missing: "
            f"{', '.join(missing)} (pip install {' '.join(missing)})"
        )
    hide_packages(hidden)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --size tiny for the dry run")
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-suite-results-"))
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as workdir, torch.inference_mode():
        suite = Suite(args, Path(workdir))
        log(f"fixture built and loaded ({time.perf_counter() - begin:.0f} s)")
        suite.environment()
        stages = (suite.precision, suite.decode, suite.bandwidth, suite.first_token, suite.memory)
        for stage in (*stages, *(getattr(suite, name) for name in SKIPPABLE)):
            if stage.__name__ in skipped:
                suite.notes.append(f"{stage.__name__} skipped (--skip).")
                continue
            started = time.perf_counter()
            stage()
            suite.results["section_s"][stage.__name__] = seconds = time.perf_counter() - started
            log(f"{stage.__name__} done in {seconds:.0f} s ({time.perf_counter() - begin:.0f} s in all)")
            suite.write(out, time.perf_counter() - begin)
    (out / "results.md").write_text(markdown(suite.results))
    print((out / "results.md").read_text())
    print(f"results: {out}")


if __name__ == "__main__":
    main()
