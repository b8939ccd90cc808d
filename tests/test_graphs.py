"""CUDA-graph decode pieces on the tiny T3: buckets, the static-shape step against the engine's
dynamic one, padding a live batch to its bucket, eager fallback, the self-check's verdicts, and
(CUDA only) replay."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from chatterbox.engine.cuda_graphs import (
    GraphedDecodeStep,
    bucket_for,
    check_buckets,
    decode_buckets,
    mismatch_bound,
    static_slot_step,
)
from chatterbox.engine.kv_cache import SlotCache, SlotContext
from chatterbox.t3 import T3
from tests.op_log import HOST_READS, OpLog

SLOTS, POSITIONS = 8, 64


@pytest.fixture(scope="module")
def t3(tiny_checkpoint: Path) -> T3:
    return T3.from_file(tiny_checkpoint / "t3_turbo_v1.safetensors")


def filled_cache(t3: T3, device: str = "cpu") -> SlotCache:
    """A slot cache whose every position holds seeded random keys and values (as after prefills)."""
    cache = SlotCache(t3.config.gpt2, SLOTS, POSITIONS, torch.float32, torch.device(device))
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


def live_batch(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """n live rows: tokens and lengths (each row's next position) that differ per row."""
    return torch.arange(n, device=device) * 389 % 6561, 5 + 7 * torch.arange(n, device=device)


@pytest.mark.parametrize(
    ("max_slots", "expected"),
    [
        (1, (1,)),
        (8, (1, 2, 4, 8)),
        (12, (1, 2, 4, 8, 12)),
        (64, (1, 2, 4, 8, 16, 32, 64)),
        (100, (1, 2, 4, 8, 16, 32, 64, 96, 100)),
        (160, (1, 2, 4, 8, 16, 32, 64, 96, 128, 160)),
    ],
)
def test_buckets_are_powers_of_two_to_64_then_steps_of_32_up_to_max_slots(max_slots, expected):
    assert decode_buckets(max_slots) == expected


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch():
    buckets = decode_buckets(100)
    picks = {n: bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 33, 64, 65, 96, 97, 100)}
    assert picks == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 16, 33: 64, 64: 64, 65: 96, 96: 96, 97: 100, 100: 100}
    with pytest.raises(ValueError, match="101 live rows exceed the largest bucket 100"):
        bucket_for(101, buckets)
    with pytest.raises(ValueError, match="max_slots must be >= 1"):
        decode_buckets(0)


@torch.inference_mode()
def test_static_step_equals_the_engines_dynamic_step(t3):
    """Attention over all cache positions, each row masked past its length, gives the logits of
    the engine's step over the longest live row only."""
    cache = filled_cache(t3)
    tokens, lengths = live_batch(3)
    kv_len = int(lengths.max()) + 1
    dynamic = t3.decode_step(tokens, lengths, SlotContext.decode(cache, lengths, kv_len, torch.float32))
    static = static_slot_step(t3, cache)(tokens, lengths)
    assert static.shape == (3, t3.config.speech_vocab)
    assert (static - dynamic).abs().max() < 1e-5


@torch.inference_mode()
def test_static_step_reads_no_value_on_the_host(t3):
    """Capture records kernels, so nothing may wait for a value (as a kv_len from lengths.max())."""
    step = static_slot_step(t3, filled_cache(t3))
    with OpLog() as log:
        step(*live_batch(3))
    assert "scaled_dot_product_attention" in log.op_names()
    assert not HOST_READS & log.op_names()


@torch.inference_mode()
def test_padding_rows_leave_the_live_rows_logits_unchanged(t3):
    cache = filled_cache(t3)
    step = static_slot_step(t3, cache)
    graphed = GraphedDecodeStep(step, SLOTS, POSITIONS - 1, torch.device("cpu"))
    for live in (3, 5):  # buckets 4 and 8: one and three padding rows
        tokens, lengths = live_batch(live)
        unpadded = step(tokens, lengths)
        staged_tokens, staged_lengths = graphed.stage(tokens, lengths)
        bucket = bucket_for(live, graphed.buckets)
        assert staged_tokens.shape == staged_lengths.shape == (bucket,)
        assert staged_lengths[live:].tolist() == [POSITIONS - 1] * (bucket - live)
        assert staged_tokens[live:].tolist() == [0] * (bucket - live)
        padded = step(staged_tokens, staged_lengths)
        assert padded.isfinite().all()  # a padding row attends to its own position at least
        assert (padded[:live] - unpadded).abs().max() < 1e-5


@torch.inference_mode()
def test_padding_rows_write_only_the_last_cache_position(t3):
    """What a padding row writes is never read: a row writes a position before attending to it."""
    cache = filled_cache(t3)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    graphed = GraphedDecodeStep(static_slot_step(t3, cache), SLOTS, POSITIONS - 1, torch.device("cpu"))
    tokens, lengths = live_batch(3)
    graphed.step(*graphed.stage(tokens, lengths))
    changed = (cache.k != before_k).any(dim=(0, 2, 4)) | (cache.v != before_v).any(
        dim=(0, 2, 4)
    )  # (slots, pos)
    expected = torch.zeros(SLOTS, POSITIONS, dtype=torch.bool)
    expected[torch.arange(3), lengths] = True  # the live rows' new keys
    expected[3, POSITIONS - 1] = True  # the one padding row of bucket 4
    assert torch.equal(changed, expected)


@torch.inference_mode()
@pytest.mark.parametrize("enabled", [True, False])
def test_without_cuda_or_when_disabled_the_step_runs_eagerly(t3, enabled):
    cache = filled_cache(t3)
    step = static_slot_step(t3, cache)
    graphed = GraphedDecodeStep(step, SLOTS, POSITIONS - 1, torch.device("cpu"), enabled=enabled)
    assert not graphed.graphed and graphed.capture_s == 0.0
    tokens, lengths = live_batch(3)
    assert torch.equal(graphed(tokens, lengths), step(tokens, lengths))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.inference_mode()
def test_replayed_graphs_equal_the_eager_step(t3):
    model = copy.deepcopy(t3).to("cuda")  # the module's fixture stays on the CPU
    cache = filled_cache(model, "cuda")
    step = static_slot_step(model, cache)
    graphed = GraphedDecodeStep(step, SLOTS, POSITIONS - 1, torch.device("cuda"))
    assert graphed.graphed and graphed.capture_s > 0
    for live in (1, 3, 8):
        tokens, lengths = live_batch(live, "cuda")
        eager = step(tokens, lengths).clone()
        replayed = graphed(tokens, lengths)
        assert replayed.shape == eager.shape
        assert (replayed - eager).abs().max() < 1e-4


@torch.inference_mode()
def test_the_self_check_sends_exactly_the_wrong_or_failing_buckets_to_eager(t3):
    step = static_slot_step(t3, filled_cache(t3))

    def eager(bucket: int) -> torch.Tensor:
        tokens = torch.arange(bucket) * 97 % 6561
        return step(tokens, torch.full_like(tokens, POSITIONS - 1)).clone()

    def replay(bucket: int) -> torch.Tensor:  # deliberately wrong for bucket 4, broken for 8
        if bucket == 8:
            raise RuntimeError("graph replay failed")
        logits = eager(bucket)
        return logits + 1e-3 * logits.abs().max() if bucket == 4 else logits

    failed = check_buckets(replay, eager, (1, 2, 4, 8), mismatch_bound(torch.float32))
    assert sorted(failed) == [4, 8]
    assert "replay differs from eager by 1.00e-03" in failed[4]
    assert "graph replay failed" in failed[8]

    # A bf16 rounding of the logits is inside bf16's bound and far outside fp32's.
    def rounded(bucket: int) -> torch.Tensor:
        return eager(bucket).bfloat16().float()

    assert check_buckets(rounded, eager, (2,), mismatch_bound(torch.bfloat16)) == {}
    assert sorted(check_buckets(rounded, eager, (2,), mismatch_bound(torch.float32))) == [2]
    nan = check_buckets(lambda b: eager(b) * float("nan"), eager, (1,), mismatch_bound(torch.bfloat16))
    assert sorted(nan) == [1]
