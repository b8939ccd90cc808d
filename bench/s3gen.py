"""S3Gen throughput: our batched decoder vs one request at a time vs upstream ``S3Gen.inference``.

Every utterance is ``--tokens`` speech tokens (250 = 10 s) with its own voice: a ``--prompt-tokens``
prompt (250 = 10 s, 500 mel frames, as a 10 s reference gives) and a random x-vector. Rates are
audio seconds produced per wall second. A sequential rate does not depend on the batch size, so the
one-at-a-time and upstream rates are measured once on a few utterances and repeated in every row.
Prints markdown tables.

    python -m bench.s3gen                       # CPU defaults (fit in ~3 min here)
    python -m bench.s3gen --device cuda --batches 1,8,32 --sequential 8 --upstream 4
    python -m bench.s3gen --compile             # eager vs torch.compile'd, side by side (only that)
    python -m bench.s3gen --compile --profile --batches 1   # and where each one's time goes
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import DTYPES, timed
from chatterbox.constants import S3GEN_SR
from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.s3gen.hift import HARMONICS, SAMPLES_PER_FRAME
from chatterbox.testing import SIZES, s3gen_state_dict
from reference.oracle import reference_available, run_reference


def make_inputs(count: int, n_speech: int, n_prompt: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k in range(count):
        tensors[f"speech_tokens_{k}"] = torch.randint(0, 6561, (n_speech,), generator=g)
        tensors[f"prompt_tokens_{k}"] = torch.randint(0, 6561, (n_prompt,), generator=g)
        tensors[f"prompt_feat_{k}"] = torch.randn(2 * n_prompt, 80, generator=g) * 2 - 6
        tensors[f"embedding_{k}"] = torch.randn(192, generator=g)
    return tensors


def requests_from(tensors: dict[str, torch.Tensor], count: int) -> list[S3GenRequest]:
    return [
        S3GenRequest(
            tensors[f"speech_tokens_{k}"],
            tensors[f"prompt_tokens_{k}"],
            tensors[f"prompt_feat_{k}"],
            tensors[f"embedding_{k}"],
            seed=k,
        )
        for k in range(count)
    ]


def audio_seconds(wavs: list[torch.Tensor]) -> float:
    return sum(w.numel() for w in wavs) / S3GEN_SR


# Ops that run a library kernel (oneDNN, BLAS, FFT, the fused SDPA) in eager and compiled code alike:
# inductor calls the same kernels for them (its "extern" kernels), so compiling cannot make them faster.
LIBRARY_OPS = (
    "aten::mkldnn_convolution",
    "aten::_mkldnn_convolution",
    "aten::_convolution_transpose",
    "aten::slow_conv_transpose",
    "aten::mkldnn_convolution_transpose",
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_fft_r2c",
    "aten::_fft_c2r",
    "aten::_fft_c2c",
    "mkldnn::_convolution_pointwise",
    "mkldnn::_linear_pointwise",
    "mkl::_mkl_linear",
)
TOP_OPS = 15


STAGES = ("flow encoder", "flow estimator steps", "HiFT and the rest")


@dataclass
class OpProfile:
    """Self CPU milliseconds of one call, per op (most first) and per stage; library-kernel time per stage."""

    ops: list[tuple[str, float]]
    stage_ms: dict[str, float]
    stage_library_ms: dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.stage_ms.values())


def profile_call(model: S3Gen, run: Callable[[], object]) -> OpProfile:
    """``run()`` under torch.profiler, each op's self time put to its stage: a range around the flow
    encoder and one around the flow sampler (the estimator's steps), by forward hooks on the two
    modules that are never compiled as a whole; everything else (HiFT, glue) is the third stage."""
    open_ranges: list[record_function] = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            open_ranges.append(record_function(f"stage: {name}"))
            open_ranges[-1].__enter__()

        return hook

    def leave(*_: object) -> None:
        open_ranges.pop().__exit__(None, None, None)

    hooks = []
    for name, module in zip(STAGES, (model.flow.encoder, model.flow.decoder), strict=False):
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    ops: dict[str, float] = defaultdict(float)
    stage_ms = dict.fromkeys(STAGES, 0.0)
    library_ms = dict.fromkeys(STAGES, 0.0)
    for event in prof.events():
        if event.name.startswith("stage: "):
            continue
        parent, stage = event.cpu_parent, STAGES[-1]
        while parent is not None and not parent.name.startswith("stage: "):
            parent = parent.cpu_parent
        if parent is not None:
            stage = parent.name.removeprefix("stage: ")
        ms = event.self_cpu_time_total / 1000
        ops[event.name] += ms
        stage_ms[stage] += ms
        if event.name in LIBRARY_OPS:
            library_ms[stage] += ms
    return OpProfile(sorted(ops.items(), key=lambda op: -op[1]), stage_ms, library_ms)


def profile_compiled(eager: S3Gen, compiled: S3Gen, requests: list[S3GenRequest]) -> None:
    """Where one batch-1 call's time goes, eager beside compiled: per stage, then per op."""
    # Best of two calls each, alternating (a shared machine's load inflates an op's self time).
    runs = [
        profile_call(m, lambda m=m: m.generate(requests[:1])) for _ in range(2) for m in (eager, compiled)
    ]
    e = min(runs[0::2], key=lambda run: run.total_ms)
    c = min(runs[1::2], key=lambda run: run.total_ms)
    print(
        "\nOne batch-1 call under torch.profiler (best of 2), self CPU time per stage (library kernels: "
        "oneDNN/BLAS convolutions and matmuls, SDPA, FFT):\n"
    )
    print("| stage | eager (ms) | share | of it library kernels | compiled (ms) | compiled / eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in STAGES:
        em, cm = e.stage_ms[stage], c.stage_ms[stage]
        print(
            f"| {stage} | {em:.0f} | {em / e.total_ms:.1%} | {e.stage_library_ms[stage] / em:.1%} | {cm:.0f} "
            f"| {cm / em:.2f}x |"
        )
    print(f"| total | {e.total_ms:.0f} | 100% | | {c.total_ms:.0f} | {c.total_ms / e.total_ms:.2f}x |")
    print(f"\nTop {TOP_OPS} ops by self CPU time, same calls:\n")
    print("| # | eager op | ms | share | compiled op | ms | share |")
    print("|---:|---|---:|---:|---|---:|---:|")
    for i, ((en, ems), (cn, cms)) in enumerate(zip(e.ops[:TOP_OPS], c.ops[:TOP_OPS], strict=False)):
        eager_cells = f"`{en}` | {ems:.0f} | {ems / e.total_ms:.1%}"
        print(f"| {i + 1} | {eager_cells} | `{cn}` | {cms:.0f} | {cms / c.total_ms:.1%} |")
    # Compiling can at most remove the time outside library kernels, and only in compiled stages.
    compiled_stages = STAGES[1:]
    removable = sum(e.stage_ms[s] - e.stage_library_ms[s] for s in compiled_stages)
    library = sum(e.stage_library_ms.values())
    print(
        f"\nCeiling of compile's gain, were every non-library op of the compiled stages free: "
        f"{e.total_ms / (e.total_ms - removable):.2f}x ({removable / e.total_ms:.1%} of eager time); "
        f"with the flow encoder compiled too: {e.total_ms / library:.2f}x."
    )
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    stats = dict(torch._dynamo.utils.counters["stats"])
    print(f"Dynamo: {sum(breaks.values())} graph break(s) {breaks or ''}; {stats}.")


def compare_compiled(
    args: argparse.Namespace, eager: S3Gen, compiled: S3Gen, requests: list[S3GenRequest], batches: list[int]
) -> None:
    """The same batches through an eager S3Gen and a compiled copy, alternating; prints a table."""
    eager.generate(requests[:1])  # warm-up at the measured size
    flow_frames, speech_frames = 2 * (args.prompt_tokens + args.tokens + 3), 2 * (args.tokens + 3)
    report = compiled.compile(batch_sizes=batches, warm=[flow_frames, speech_frames])
    flow_bucket = compiled.flow.decoder.compiled.bucket(flow_frames)
    hift_bucket = compiled.compiled_vocoder.bucket(speech_frames)
    rows = []
    for b in batches:
        rates: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, model in (("eager", eager), ("compiled", compiled)):
                wavs: list[torch.Tensor] = []
                seconds = timed(lambda m=model, w=wavs, b=b: w.extend(m.generate(requests[:b])), args.device)
                rates[name].append(audio_seconds(wavs) / seconds)
        worst = max(
            float((a - c).abs().max() / a.abs().max())
            for a, c in zip(eager.generate(requests[:b]), compiled.generate(requests[:b]), strict=True)
        )
        rows.append((b, max(rates["eager"]), max(rates["compiled"]), worst))
    print(
        f"\nS3Gen eager vs torch.compile (inductor) on {args.device} ({args.dtype} flow, fp32 HiFT), "
        f"{args.threads} threads, flow width {eager.flow.config.encoder.width}; utterances of {args.tokens} "
        f"speech tokens with a {args.prompt_tokens}-token prompt: flow rows of {flow_frames} frames "
        f"(bucket {flow_bucket}), mels of {speech_frames} frames (HiFT bucket {hift_bucket}, one mel at a "
        f"time: batch_vocoder={compiled.batch_vocoder}). Best of {args.repeats} call(s) each, alternating.\n"
    )
    print("| batch | eager (audio s/s) | compiled (audio s/s) | compiled / eager | max |diff| / peak |")
    print("|---|---|---|---|---|")
    for b, eager_rate, compiled_rate, worst in rows:
        print(
            f"| {b} | {eager_rate:.3f} | {compiled_rate:.3f} | {compiled_rate / eager_rate:.2f}x "
            f"| {worst:.1e} |"
        )
    errors = "; ".join(report.errors) or "none"
    print(f"\nCompile: {report.seconds:.0f} s for {report.shapes} graphs (eager fallbacks: {errors}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=os.environ.get("CHATTERBOX_FULL_CHECKPOINT"))
    parser.add_argument(
        "--size", choices=["full", "tiny"], default="full", help="random checkpoint if none given"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes for our batched call")
    parser.add_argument("--sequential", type=int, default=2, help="utterances for our one-at-a-time rate")
    parser.add_argument("--upstream", type=int, default=1, help="utterances for upstream (0 skips it)")
    parser.add_argument("--hift", type=int, default=4, help="mels for the HiFT strategy comparison (0 skips)")
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--prompt-tokens", type=int, default=250)
    parser.add_argument(
        "--compile", action="store_true", help="only eager vs S3Gen.compile, same requests, per batch"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per model and batch (--compile)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --compile: self CPU time per stage and op, one batch-1 call",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    count = max([*batches, args.sequential, args.upstream, args.hift])

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:  # a random one in the official layout (only the S3Gen file is needed)
            checkpoint = Path(tmp)
            save_file(s3gen_state_dict(SIZES[args.size], seed=0), checkpoint / "s3gen_meanflow.safetensors")
        model = S3Gen.from_file(checkpoint / "s3gen_meanflow.safetensors", args.device, DTYPES[args.dtype])
        tensors = make_inputs(count, args.tokens, args.prompt_tokens)
        requests = requests_from(tensors, count)
        if args.compile:
            compiled = S3Gen.from_file(
                checkpoint / "s3gen_meanflow.safetensors", args.device, DTYPES[args.dtype]
            )
            compare_compiled(args, model, compiled, requests, batches)
            if args.profile:
                profile_compiled(model, compiled, requests)
            return
        model.generate(requests[:1])  # warm-up at the measured size

        ours_batched = {}
        for b in batches:
            wavs: list[torch.Tensor] = []
            seconds = timed(lambda b=b, wavs=wavs: wavs.extend(model.generate(requests[:b])), args.device)
            ours_batched[b] = audio_seconds(wavs) / seconds
        seq_wavs: list[torch.Tensor] = []
        seq_seconds = timed(
            lambda: [seq_wavs.extend(model.generate([r])) for r in requests[: args.sequential]], args.device
        )
        ours_sequential = audio_seconds(seq_wavs) / seq_seconds

        upstream = None
        # Upstream builds the official sizes only, in float32; its venv may be absent (device machines).
        official = model.flow.config.encoder.width == 512
        if args.upstream and official and reference_available() and args.dtype == "fp32":
            subset = {k: v for k, v in tensors.items() if int(k.rsplit("_", 1)[1]) < args.upstream}
            _, result = run_reference(
                "s3gen.benchmark", subset, ckpt_dir=str(checkpoint), device=args.device, threads=args.threads
            )
            upstream = sum(result["samples"]) / S3GEN_SR / sum(result["seconds"])

        hift_rows = []
        if args.hift:
            frames = 2 * (args.tokens + 3)
            mel = torch.randn(args.hift, 80, frames, device=args.device) - 5
            phases = torch.rand(args.hift, HARMONICS, device=args.device)
            noise = torch.randn(args.hift, HARMONICS, SAMPLES_PER_FRAME * frames, device=args.device)
            with torch.inference_mode():
                batched = timed(lambda: model.mel2wav(mel, phases, noise), args.device)
                alone = timed(
                    lambda: [
                        model.mel2wav(mel[i : i + 1], phases[i : i + 1], noise[i : i + 1])
                        for i in range(args.hift)
                    ],
                    args.device,
                )
            audio = args.hift * frames * SAMPLES_PER_FRAME / S3GEN_SR
            hift_rows = [("one batch (equal lengths)", audio / batched), ("one mel at a time", audio / alone)]

    width = model.flow.config.encoder.width
    print(
        f"\nS3Gen on {args.device} ({args.dtype} flow, fp32 HiFT), {args.threads} threads, "
        f"flow width {width}; utterances of {args.tokens} speech tokens (+3 silence) "
        f"with a {args.prompt_tokens}-token prompt.\n"
    )
    print(
        "| batch | ours batched (audio s/s) | ours one at a time | upstream sequential "
        "| batched / one at a time | batched / upstream |"
    )
    print("|---|---|---|---|---|---|")
    up = f"{upstream:.3f}" if upstream else "n/a"
    for b, rate in ours_batched.items():
        vs_up = f"{rate / upstream:.2f}x" if upstream else "n/a"
        print(
            f"| {b} | {rate:.3f} | {ours_sequential:.3f} | {up} | {rate / ours_sequential:.2f}x | {vs_up} |"
        )
    print(
        f"\nOne-at-a-time rate from {args.sequential} utterance(s); upstream rate from {args.upstream} "
        "utterance(s) (its own process, same thread count, after a warm-up call)."
    )
    if hift_rows:
        print(f"\nHiFT strategy ({args.hift} mels of {2 * (args.tokens + 3)} frames):\n")
        print("| HiFT strategy | audio s/s |")
        print("|---|---|")
        for name, rate in hift_rows:
            print(f"| {name} | {rate:.3f} |")


if __name__ == "__main__":
    main()
