"""T3's decode step as CUDA graphs, one per batch-size bucket (issue 13).

A decode step over B live rows launches a few hundred small kernels; at small B the GPU waits on
the launches. A CUDA graph replays all of them at once, but only for the shapes it was captured
with, so the live batch is padded to a bucket (1, 2, 4, 8, 16, 32, 64, then every 32 up to the
slot count) and the step must have static shapes: it attends over the whole slot cache under a
per-row mask instead of over the longest live row. Padded rows are masked like any other row
(each row attends only to its own keys), so they never change a live row's logits.

The step is any callable ``step(tokens (b,), lengths (b,)) -> logits (b, V)`` that reads and
writes cache rows 0..b-1, each row writing its new key at position ``lengths[i]``
(``static_slot_step`` makes T3's); a padded row gets token 0 and length ``pad_length``, which must
be a cache position no row reads before writing it. The last one is: a row writes a position
before it attends to it, so a padded row may scribble there on a free row, or on a row still
prefilling, unseen.

Capture needs CUDA; elsewhere, or with ``enabled=False``, ``GraphedDecodeStep`` calls the step on
the live rows as they are (eager).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from chatterbox.t3.slots import SlotCache, SlotContext
from chatterbox.t3.t3 import T3

DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, lengths) -> logits
SMALL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LARGE_BUCKET_STEP = 32
WARMUP_STEPS = 3  # eager runs on a side stream before capture (cuBLAS/SDPA pick their kernels)


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
    warm-up runs; ``capture_s`` is the time that took. Each call copies the live tokens and
    lengths into the static input buffers, fills the padding rows, replays the bucket's graph and
    returns the live rows of its static output: a view that the next call overwrites.
    """

    def __init__(
        self,
        step: DecodeStep,
        max_slots: int,
        pad_length: int,
        device: torch.device,
        enabled: bool = True,
    ) -> None:
        self.step = step
        self.buckets = decode_buckets(max_slots)
        self.pad_length = pad_length
        self.graphed = enabled and device.type == "cuda" and torch.cuda.is_available()
        self.capture_s = 0.0
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
            with torch.cuda.graph(graph, pool=pool):
                logits = self.step(tokens, lengths)
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start

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
        if not self.graphed:
            return self.step(tokens, lengths)
        staged, _ = self.stage(tokens, lengths)
        graph, logits = self._graphs[staged.shape[0]]
        graph.replay()
        return logits[: tokens.shape[0]]
