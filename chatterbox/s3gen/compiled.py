"""torch.compile (inductor) for S3Gen's two hot modules, over a few length buckets.

The flow estimator and HiFT run on inputs padded along time to the smallest bucket that holds them,
so a handful of static shapes serve every length (inductor specializes on shapes; one graph per
(batch size, bucket), made at ``S3Gen.compile`` and reused). Padding is exact for both: the
estimator masks every conv input and attention key, and HiFT is given each row's length (its
mask-aware path). Lengths past the largest bucket run eager.

A compile error (no C++ compiler, an unsupported op, a failed recompile at a new shape) warns once
and switches that module to eager for good: the result is then the eager one.
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox.s3gen.hift import SAMPLES_PER_FRAME

# Mel frames of one flow row (voice prompt + speech + silence): a 10 s prompt is 500 frames.
FLOW_BUCKETS = (256, 512, 768, 1024, 1536, 2048)
# Mel frames of one vocoded mel (speech only; 50 per second of audio).
HIFT_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536)


@dataclass(frozen=True)
class CompileReport:
    seconds: float  # wall time of compiling (and running once) every requested shape
    shapes: int  # (module, batch size, bucket) graphs made
    errors: tuple[str, ...]  # modules that fell back to eager, with the error (empty: all compiled)


class Bucketed:
    """``module`` through ``torch.compile`` on inputs padded to a time bucket, eager beyond them.

    ``pad(bucket, *args)`` returns the padded arguments and ``length(*args)`` the time length the
    bucket must hold; the compiled output is cut back to the caller's length with ``trim``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        buckets: Sequence[int],
        length: Callable[..., int],
        pad: Callable[..., tuple[Tensor, ...]],
        trim: Callable[[Tensor, int], Tensor],
    ) -> None:
        self.name = name
        self.module = module
        self.buckets = sorted(buckets)
        self._length, self._pad, self._trim = length, pad, trim
        self._compiled = torch.compile(module, backend="inductor", dynamic=False)
        self.error: str | None = None  # set once a compile failed: eager from then on

    def bucket(self, length: int) -> int | None:
        """The smallest bucket holding ``length`` frames (None: longer than every bucket)."""
        i = bisect.bisect_left(self.buckets, length)
        return self.buckets[i] if i < len(self.buckets) else None

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        length = self._length(*args)
        bucket = self.bucket(length)
        if bucket is None or self.error is not None:
            return self.module(*args)
        if torch.is_inference_mode_enabled():
            # Dynamo guards on whether each input is an inference tensor. Serving passes inference
            # tensors; a warm-up's inputs made outside inference mode would compile a graph that
            # serving never reuses (and serving would compile its own on its first call).
            args = tuple(a.clone() if a is not None and not a.is_inference() else a for a in args)
        # Any failure of the compiled call runs the eager one, which raises again if the inputs are at fault.
        try:
            out = self._compiled(*self._pad(bucket, *args))
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}".splitlines()[0]
            message = f"torch.compile of S3Gen's {self.name} failed, running eager: {self.error}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return self.module(*args)
        return self._trim(out, length)


def compiled_estimator(estimator: nn.Module, buckets: Sequence[int] = FLOW_BUCKETS) -> Bucketed:
    """The estimator's call ``(x, mask, mu, t_emb, spks, cond)`` with x, mu, cond (B, 80, T) and
    mask (B, 1, T) padded with zeros (masked-out frames) to the bucket; output (B, 80, T)."""

    def pad(
        bucket: int, x: Tensor, mask: Tensor, mu: Tensor, t_emb: Tensor, spks: Tensor, cond: Tensor
    ) -> tuple[Tensor, ...]:
        extra = (0, bucket - x.shape[-1])
        return F.pad(x, extra), F.pad(mask, extra), F.pad(mu, extra), t_emb, spks, F.pad(cond, extra)

    return Bucketed(
        "flow estimator",
        estimator,
        buckets,
        length=lambda x, *_: x.shape[-1],
        pad=pad,
        trim=lambda out, length: out[..., :length],
    )


def compiled_hift(hift: nn.Module, buckets: Sequence[int] = HIFT_BUCKETS) -> Bucketed:
    """HiFT's call ``(mel, phases, noise, lengths=None)`` with mel (B, 80, L) and noise (B, 9, 480L)
    padded to the bucket and every row's length given (None: L); output (B, 480L)."""

    def pad(
        bucket: int, mel: Tensor, phases: Tensor, noise: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        frames = mel.shape[-1]
        if lengths is None:
            lengths = torch.full((mel.shape[0],), frames, device=mel.device, dtype=torch.long)
        extra = bucket - frames
        return F.pad(mel, (0, extra)), phases, F.pad(noise, (0, SAMPLES_PER_FRAME * extra)), lengths

    return Bucketed(
        "HiFT",
        hift,
        buckets,
        length=lambda mel, *_: mel.shape[-1],
        pad=pad,
        trim=lambda out, length: out[:, : SAMPLES_PER_FRAME * length],
    )


def warm_up(runs: Sequence[Callable[[], object]], modules: Sequence[Bucketed]) -> CompileReport:
    """Run every shape once (inductor compiles on first call) and report the time and any fallback."""
    start = time.perf_counter()
    with torch.inference_mode():
        for run in runs:
            run()
    errors = tuple(f"{m.name}: {m.error}" for m in modules if m.error is not None)
    return CompileReport(seconds=time.perf_counter() - start, shapes=len(runs), errors=errors)
