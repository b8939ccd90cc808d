"""T3's decode step as CUDA graphs, one per batch-size bucket.

At small batches a decode step waits on its few hundred kernel launches; a graph replays them at
once, but only at its captured shapes. So the live batch is padded to a bucket (1, 2, 4, ..., 64,
then every 32 up to the slot count) and the step attends over the whole slot cache under a per-row
mask. A padded row (token 0, length ``pad_length``) attends only to its own keys, and writes at a
position no row reads before writing it, so it never changes a live row.

Without CUDA, or with ``enabled=False``, the step runs eagerly on the live rows. After capture each
bucket replays a probe batch against the eager step; a bucket whose capture fails or whose replay
differs beyond ``mismatch_bound`` logs a warning, joins ``eager_buckets`` and runs eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from chatterbox.constants import SPEECH_VOCAB_SIZE
from chatterbox.engine.kv_cache import SlotCache, SlotContext
from chatterbox.t3.t3 import T3

logger = logging.getLogger(__name__)

DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, lengths) -> logits
SMALL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LARGE_BUCKET_STEP = 32
WARMUP_STEPS = 3  # eager runs on a side stream before capture (cuBLAS/SDPA pick their kernels)
MISMATCH_EPS = 8  # a replay may differ from eager by this many epsilons of the backbone's dtype


def mismatch_bound(dtype: torch.dtype) -> float:
    """Largest |replayed - eager| logit difference accepted, relative to the eager logits' largest
    magnitude: a few rounding steps of the backbone's dtype (bf16: about 6e-2, fp32: about 1e-6)."""
    return MISMATCH_EPS * torch.finfo(dtype).eps


def check_buckets(
    replay: Callable[[int], torch.Tensor],
    eager: Callable[[int], torch.Tensor],
    buckets: Iterable[int],
    bound: float,
) -> dict[int, str]:
    """The buckets whose ``replay(bucket)`` logits differ from ``eager(bucket)``'s beyond ``bound``
    (relative to the eager logits' largest magnitude), or that raise, each with why."""
    failed = {}
    for bucket in buckets:
        try:
            expected = eager(bucket)
            error = float((replay(bucket) - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
        except Exception as exc:  # a replay that cannot run is a mismatch too
            failed[bucket] = f"replay failed: {exc}"
            continue
        if not error <= bound:  # NaN fails too
            failed[bucket] = f"replay differs from eager by {error:.2e} (relative; bound {bound:.2e})"
    return failed


def decode_buckets(max_slots: int) -> tuple[int, ...]:
    """Batch sizes graphs are captured for: powers of two to 64, then steps of 32, and max_slots."""
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    large = range(SMALL_BUCKETS[-1] + LARGE_BUCKET_STEP, max_slots, LARGE_BUCKET_STEP)
    return (*(b for b in (*SMALL_BUCKETS, *large) if b < max_slots), max_slots)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n live rows."""
    for bucket in buckets:
        if bucket >= n:
            return bucket
    raise ValueError(f"{n} live rows exceed the largest bucket {buckets[-1]}")


def static_slot_step(t3: T3, cache: SlotCache) -> DecodeStep:
    """T3's decode step over cache rows 0..b-1 with static shapes: attention spans all of the
    cache's positions, each row masked past its own length (``SlotContext.decode``)."""
    dtype = t3.speech_emb.weight.dtype

    def step(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        context = SlotContext.decode(cache, lengths, cache.positions, dtype)  # mask (b, 1, 1, positions)
        return t3.decode_step(tokens, lengths, context)

    return step


class GraphedDecodeStep:
    """Replays a captured ``step`` for the live batch's bucket; eager where CUDA graphs are off.

    Captures every bucket at construction (largest first, all sharing one memory pool) after
    warm-up runs, then self-checks them; ``capture_s`` is the time that took. Each call copies the
    live tokens and lengths into the static input buffers, fills the padding rows, replays the
    bucket's graph and returns the live rows of its static output: a view that the next call
    overwrites. A bucket in ``eager_buckets`` calls the step eagerly instead.
    """

    def __init__(
        self,
        step: DecodeStep,
        max_slots: int,
        pad_length: int,
        device: torch.device,
        enabled: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.step = step
        self.buckets = decode_buckets(max_slots)
        self.pad_length = pad_length
        self.graphed = enabled and device.type == "cuda" and torch.cuda.is_available()
        self.capture_s = 0.0
        self.eager_buckets: dict[int, str] = {}  # bucket -> why it runs eagerly
        self._bound = mismatch_bound(dtype)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, logits)
        # One set of static inputs; bucket b's graph reads their first b rows.
        self._tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        self._lengths = torch.full((max_slots,), pad_length, dtype=torch.long, device=device)
        if self.graphed:
            self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for bucket in sorted(self.buckets, reverse=True):  # the largest sizes the shared pool
            tokens, lengths = self._tokens[:bucket], self._lengths[:bucket]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.step(tokens, lengths)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.step(tokens, lengths)
            except Exception as error:  # e.g. an op that cannot be captured
                self.eager_buckets[bucket] = f"capture failed: {error}"
                continue
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize()
        self.eager_buckets.update(
            check_buckets(self._replay_probe, self._eager_probe, self._graphs, self._bound)
        )
        for bucket, why in sorted(self.eager_buckets.items()):
            logger.warning("CUDA graph of decode bucket %d disabled, it runs eagerly: %s", bucket, why)
            self._graphs.pop(bucket, None)
        self.capture_s = time.perf_counter() - start

    def _probe(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A probe batch: distinct tokens, every row at ``pad_length`` (a position nobody reads
        before writing it, so the probe leaves no trace in the cache)."""
        tokens = torch.arange(bucket, device=self._tokens.device) * 97 % SPEECH_VOCAB_SIZE
        return tokens, torch.full_like(tokens, self.pad_length)

    def _eager_probe(self, bucket: int) -> torch.Tensor:
        return self.step(*self._probe(bucket)).clone()

    def _replay_probe(self, bucket: int) -> torch.Tensor:
        self.stage(*self._probe(bucket))
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits.clone()

    def stage(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy live (B,) tokens and lengths into the static buffers, padded to B's bucket with
        padding rows (token 0, ``pad_length``); returns the (bucket,) views a graph reads."""
        live = tokens.shape[0]
        bucket = bucket_for(live, self.buckets)
        self._tokens[:live].copy_(tokens)
        self._lengths[:live].copy_(lengths)
        self._tokens[live:bucket].zero_()
        self._lengths[live:bucket].fill_(self.pad_length)
        return self._tokens[:bucket], self._lengths[:bucket]

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens, lengths (B,) int64 of live rows 0..B-1 -> logits (B, V)."""
        if not self.graphed or bucket_for(tokens.shape[0], self.buckets) in self.eager_buckets:
            return self.step(tokens, lengths)
        staged, _ = self.stage(tokens, lengths)
        graph, logits = self._graphs[staged.shape[0]]
        graph.replay()
        return logits[: tokens.shape[0]]
