"""How far a streamed utterance is from its full decode, per hop schedule.

Both decodes use the same draws at the same positions (``PositionalNoise.utterance``), so every
difference comes from streaming (a hop's shorter flow row, the seams). Per utterance: log-mel L1
(mean |ln mel(streamed) - ln mel(full)|) overall and in the seam windows (each cross-fade plus
``SEAM_MARGIN_FRAMES`` either side); the streamed audio's largest sample-to-sample jump in those
windows next to the full decode's (a click stands far above it); and, for scale, the log-mel L1
between two full decodes with different draws. ``--schedules`` adds other first hops and overlaps.

    python -m bench.streaming_quality                     # the tiny fixture's S3Gen, a few minutes on CPU
    python -m bench.streaming_quality --size full         # make-checkpoint --size full --seed 0's S3Gen
    python -m bench.streaming_quality --checkpoint DIR    # real weights (s3gen_meanflow.safetensors)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.s3gen.hift import SAMPLES_PER_FRAME
from chatterbox.s3gen.streaming import HopSchedule, PositionalNoise, StreamingS3Gen
from chatterbox.testing import SIZES, s3gen_state_dict
from chatterbox.voice.features import s3gen_mel

SEAM_MARGIN_FRAMES = 8  # mel frames either side of a cross-fade that count as the seam's window


@dataclass(frozen=True)
class StreamQuality:
    mel_l1: float  # mean |ln mel difference| over the utterance
    seam_mel_l1: float  # the same over the seam windows (nan without seams)
    seam_jump: float  # largest sample-to-sample step of the streamed audio in the seam windows
    full_jump_at_seams: float  # the full decode's largest step in the same windows
    seams: int
    reseeded_mel_l1: float  # full decode vs a full decode with other draws: the scale of mel_l1


def seam_windows(pieces: Sequence[torch.Tensor], overlap_frames: int, total: int) -> list[tuple[int, int]]:
    """Sample ranges around each seam: a piece after the first begins with the cross-fade region."""
    margin = SEAM_MARGIN_FRAMES * SAMPLES_PER_FRAME
    windows, start = [], 0
    for piece in pieces[:-1]:
        start += piece.numel()
        windows.append(
            (max(0, start - margin), min(total, start + overlap_frames * SAMPLES_PER_FRAME + margin))
        )
    return windows


def largest_jump(wav: torch.Tensor, windows: Sequence[tuple[int, int]]) -> float:
    steps = wav.diff().abs()
    return max((float(steps[a : b - 1].max()) for a, b in windows if b - a > 1), default=0.0)


def log_mel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(frames, 80) |ln mel(a) - ln mel(b)| of two equally long 24 kHz waveforms."""
    return (s3gen_mel(a) - s3gen_mel(b)).abs()


def measure(
    pieces: Sequence[torch.Tensor], full: torch.Tensor, reseeded: torch.Tensor, overlap_frames: int
) -> StreamQuality:
    """Compare a stream's pieces with the full decode of the same tokens and draws (and, for scale,
    that full decode with a full decode of other draws)."""
    streamed = torch.cat(list(pieces))
    if streamed.shape != full.shape:
        raise ValueError(f"streamed {tuple(streamed.shape)} samples, full decode {tuple(full.shape)}")
    distance = log_mel_l1(streamed, full)
    windows = seam_windows(pieces, overlap_frames, streamed.numel())
    seam_frames = sorted(
        {
            f
            for a, b in windows
            for f in range(a // SAMPLES_PER_FRAME, min(b // SAMPLES_PER_FRAME, len(distance)))
        }
    )
    return StreamQuality(
        mel_l1=float(distance.mean()),
        seam_mel_l1=float(distance[seam_frames].mean()) if seam_frames else float("nan"),
        seam_jump=largest_jump(streamed, windows),
        full_jump_at_seams=largest_jump(full, windows),
        seams=len(windows),
        reseeded_mel_l1=float(log_mel_l1(reseeded, full).mean()),
    )


def utterances(count: int, n_prompt: int, n_speech: int, odd_prompt: bool = False) -> list[S3GenRequest]:
    """Random tokens, prompt mel and x-vector per utterance (a fixture checkpoint speaks noise anyway)."""
    g = torch.Generator().manual_seed(0)
    return [
        S3GenRequest(
            speech_tokens=torch.randint(0, 6561, (n_speech,), generator=g),
            prompt_tokens=torch.randint(0, 6561, (n_prompt,), generator=g),
            prompt_feat=torch.randn(2 * n_prompt + odd_prompt, 80, generator=g) * 2 - 6,
            embedding=torch.randn(192, generator=g),
            seed=k,
        )
        for k in range(count)
    ]


def stream_and_measure(
    s3gen: S3Gen, schedule: HopSchedule, requests: Sequence[S3GenRequest]
) -> list[StreamQuality]:
    """Stream each request token by token (all side by side) and measure it against its full decode."""
    streamed = StreamingS3Gen(s3gen, schedule).stream_tokens(requests)
    results = []
    for request, pieces in zip(requests, streamed, strict=True):
        full, reseeded = (
            s3gen.generate([request], [PositionalNoise(seed, s3gen.device).utterance(request)])[0]
            for seed in (request.seed, request.seed + 1000)
        )
        results.append(measure(pieces, full.float().cpu(), reseeded.float().cpu(), schedule.overlap_frames))
    return results


def summary_row(label: str, results: Sequence[StreamQuality]) -> str:
    def worst(name: str) -> float:
        return max(getattr(r, name) for r in results)

    mean_l1 = statistics.fmean(r.mel_l1 for r in results)
    return (
        f"| {label} | {results[0].seams} | {mean_l1:.3f} | {worst('mel_l1'):.3f} "
        f"| {worst('seam_mel_l1'):.3f} "
        f"| {worst('seam_jump'):.4f} | {worst('full_jump_at_seams'):.4f} "
        f"| {statistics.fmean(r.reseeded_mel_l1 for r in results):.3f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="fixture S3Gen (seed 0)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory instead of a fixture")
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=250, help="voice prompt (250 = 10 s)")
    parser.add_argument("--speech-tokens", type=int, default=250, help="utterance length (250 = 10 s)")
    parser.add_argument("--schedules", action="store_true", help="also other first hops and overlaps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        s3gen = S3Gen.from_file(args.checkpoint / "s3gen_meanflow.safetensors")
    else:  # the same tensors as ``python -m chatterbox.testing make-checkpoint DIR --size ... --seed 0``
        s3gen = S3Gen.from_state_dict(s3gen_state_dict(SIZES[args.size], seed=0))
    default = HopSchedule()
    schedules = [("default", default)]
    if args.schedules:
        schedules += [
            (f"first_hop={first}", dataclasses.replace(default, first_hop=first)) for first in (8, 24, 40)
        ]
        schedules += [
            (f"overlap_frames={overlap}", dataclasses.replace(default, overlap_frames=overlap))
            for overlap in (0, 4)
        ]
        schedules += [("left_context=20", dataclasses.replace(default, left_context=20))]
    print(
        f"{args.checkpoint or args.size + ' fixture'}: {args.utterances} utterances of "
        f"{args.speech_tokens} tokens, prompt {args.prompt_tokens} tokens (even) and {args.prompt_tokens} "
        "tokens + 1 frame (odd); streamed one token at a time\n"
    )
    columns = [
        "schedule",
        "seams",
        "log-mel L1 mean",
        "log-mel L1 max",
        "seam log-mel L1 max",
        "seam jump max",
        "full decode's jump there",
        "other seed's log-mel L1",
    ]
    print(f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
    for odd in (False, True):
        requests = utterances(args.utterances, args.prompt_tokens, args.speech_tokens, odd_prompt=odd)
        for label, schedule in schedules:
            print(
                summary_row(
                    f"{label}{' (odd prompt)' if odd else ''}", stream_and_measure(s3gen, schedule, requests)
                )
            )


if __name__ == "__main__":
    main()
