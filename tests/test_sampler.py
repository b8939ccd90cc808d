"""Logits processors against a per-row transcription of HF's semantics; seeded Gumbel sampling."""

from __future__ import annotations

import pytest
import torch

from chatterbox.t3.sampler import (
    NOISE_BITS,
    gumbel_from_bits,
    gumbel_noise,
    index_keys,
    process_logits,
    sample,
    seed_keys,
)
from tests.op_log import HOST_READS, OpLog

# Tokens the sampler drew before its constants were cached (commit aa1804d), for the inputs of
# ``_seeded_decode_inputs``: 16 steps x 8 rows. Any change to the hash, the noise or the
# processors shows up here as a different token.
RECORDED_TOKENS = [
    [1491, 6353, 315, 6354, 5855, 344, 6490, 4737],
    [2019, 4566, 1797, 2987, 1605, 2689, 1953, 4792],
    [5914, 3116, 2161, 1577, 3833, 6207, 2981, 9],
    [1012, 5861, 5247, 4309, 1789, 4733, 2445, 2775],
    [867, 3374, 6315, 4467, 4743, 4950, 3343, 3035],
    [6164, 6382, 792, 2666, 1525, 3043, 4830, 6129],
    [58, 5738, 2508, 2212, 5972, 4688, 1413, 252],
    [4408, 5436, 3831, 5179, 5542, 5237, 2279, 2076],
    [271, 3462, 1539, 926, 1796, 5500, 2810, 2492],
    [398, 6136, 4805, 1915, 417, 4438, 2579, 1636],
    [6531, 4820, 418, 4124, 1317, 3200, 6262, 4055],
    [4926, 948, 4033, 1519, 5812, 3538, 6019, 1607],
    [6439, 783, 4709, 4532, 2486, 3320, 1860, 2039],
    [3938, 2190, 103, 3087, 3358, 1971, 4579, 471],
    [5790, 4478, 4546, 4297, 2161, 1473, 2450, 2074],
    [5359, 773, 3887, 1171, 1938, 2115, 6490, 5195],
]


def _hf_row(
    scores: torch.Tensor, seen_ids: list[int], temperature: float, top_k: int, top_p: float, penalty: float
) -> torch.Tensor:
    """One row through HF's Temperature -> TopK -> TopP -> RepetitionPenalty, skipped when inactive."""
    scores = scores[None].clone()
    if temperature != 1.0:
        scores = scores / temperature
    k = min(top_k, scores.shape[-1])
    scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_ids, remove), float("-inf"))
    if penalty != 1.0:
        ids = torch.tensor([seen_ids])
        picked = torch.gather(scores, 1, ids)
        scores = scores.scatter(1, ids, torch.where(picked < 0, picked * penalty, picked / penalty))
    return scores[0]


def test_processors_match_hf_semantics_row_by_row():  # every row's k covers the tie
    g = torch.Generator().manual_seed(0)
    B, V = 6, 300
    logits = torch.randn(B, V, generator=g) * 3
    logits[2, :40] = logits[2].max() + 1  # a tie across the top-k boundary is kept, as in HF
    settings = [
        (0.8, 1000, 0.95, 1.2),
        (1.0, 5, 1.0, 1.0),
        (0.7, 10, 1.0, 1.5),
        (1.5, 300, 0.3, 0.9),
        (0.3, 1, 0.95, 1.2),
        (2.0, 50, 0.99, 3.0),
    ]
    seen_ids = [[1, 1, 5], [0], [0, 2, 299], [17, 4], [8], list(range(0, 300, 3))]
    seen = torch.zeros(B, V, dtype=torch.bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    temperature, top_k, top_p, penalty = (torch.tensor(col) for col in zip(*settings, strict=True))
    ours = process_logits(logits, seen, temperature.float(), top_k, top_p.float(), penalty.float(), V)
    for row in range(B):
        expected = _hf_row(logits[row], seen_ids[row], *settings[row])
        assert torch.equal(ours[row].isinf(), expected.isinf()), row
        torch.testing.assert_close(ours[row], expected, rtol=1e-6, atol=1e-6)
    assert (ours[2] > float("-inf")).sum() == 40  # all tied entries survive top_k=10
    assert (ours[4] > float("-inf")).sum() == 1


def test_sorting_only_the_largest_top_k_changes_nothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6563, generator=g) * 2
    seen = torch.rand(4, 6563, generator=g) < 0.01
    top_k = torch.tensor([1000, 3, 250, 1])
    params = (torch.tensor([0.8, 1.0, 0.5, 1.3]), top_k, torch.tensor([0.95, 1.0, 0.5, 0.9]))
    penalty = torch.tensor([1.2, 1.0, 2.0, 1.2])
    full = process_logits(logits, seen, *params, penalty, 6563)
    assert torch.equal(process_logits(logits, seen, *params, penalty, 1000), full)
    for row in range(4):
        settings = (float(params[0][row]), int(top_k[row]), float(params[2][row]), float(penalty[row]))
        expected = _hf_row(logits[row], seen[row].nonzero()[:, 0].tolist(), *settings)
        torch.testing.assert_close(full[row], expected, rtol=1e-6, atol=1e-6)


def test_gumbel_noise_is_a_function_of_key_step_and_index_only():
    keys = seed_keys(torch.tensor([0, 1, 2**62 + 3, 0]))
    steps = torch.tensor([5, 5, 5, 6])
    noise = gumbel_noise(keys, steps, 500)
    alone = torch.cat([gumbel_noise(keys[i : i + 1], steps[i : i + 1], 500) for i in range(4)])
    assert torch.equal(noise, alone)
    assert noise.isfinite().all()
    assert len({tuple(row.tolist()) for row in noise}) == 4  # seed and step both change the draw
    assert len(set(seed_keys(torch.arange(1000)).tolist())) == 1000


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    scores = probs.log()[None].expand(4000, -1)  # one row per draw, each its own seed
    draws = sample(scores, seed_keys(torch.arange(4000)), torch.full((4000,), 3))
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert freq[4] == 0  # a -inf score is never drawn
    assert (freq - probs).abs().max() < 0.03
    # and over steps of one seed
    steps = torch.arange(4000)
    draws = sample(scores, seed_keys(torch.full((4000,), 42)), steps)
    assert ((torch.bincount(draws, minlength=5).float() / 4000) - probs).abs().max() < 0.03


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1])
def test_sample_keeps_the_only_finite_score(seed: int):
    scores = torch.full((1, 6563), float("-inf"))
    scores[0, 4321] = -50.0
    assert sample(scores, seed_keys(torch.tensor([seed])), torch.tensor([0])).item() == 4321


def test_gumbel_noise_is_finite_for_every_bit_pattern_edge():
    """The largest draw once rounded to 1.0 in float32, giving +inf noise and -inf + inf = NaN,
    which argmax picked: a token that top-k had filtered out."""
    edges = torch.tensor([0, 1, 2**NOISE_BITS - 2, 2**NOISE_BITS - 1])
    noise = gumbel_from_bits(edges)
    assert torch.isfinite(noise).all()
    assert noise.max() < 17 and noise.min() > -3


def test_greedy_ignores_the_seed():
    scores = torch.full((1, 6563), float("-inf"))
    scores[0, 845] = 1.0
    keys = seed_keys(torch.tensor([seed for seed in range(0, 2**63 - 1, 2**55)]))
    for step in range(64):
        steps = torch.full((keys.numel(),), step)
        assert (sample(scores.expand(keys.numel(), -1), keys, steps) == 845).all()


def _seeded_decode_inputs(device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """16 steps of (8, 6563) logits, a seen mask, per-row settings and row keys."""
    g = torch.Generator().manual_seed(1234)
    B, V = 8, 6563
    logits = torch.randn(16, B, V, generator=g) * 3
    seen = torch.rand(B, V, generator=g) < 0.02
    temperature = torch.tensor([0.8, 1.0, 0.5, 1.3, 0.05, 2.0, 1.0, 0.7])
    top_k = torch.tensor([1000, 1, 50, 6563, 1000, 20, 300, 2])
    top_p = torch.tensor([0.95, 1.0, 0.5, 0.9, 1.0, 0.99, 0.3, 1.0])
    penalty = torch.tensor([1.2, 1.0, 2.0, 1.2, 1.0, 1.5, 0.9, 1.2])
    keys = seed_keys(torch.tensor([0, 1, 2**63 - 1, 42, 7, 2**40, 99, 123456789]))
    return tuple(t.to(device) for t in (logits, seen, temperature, top_k, top_p, penalty, keys))


def _decode(inputs: tuple[torch.Tensor, ...], candidates: int = 1000) -> list[list[int]]:
    logits, seen, *settings, keys = inputs
    tokens = []
    for step in range(logits.shape[0]):
        scores = process_logits(logits[step], seen, *settings, candidates)
        tokens.append(sample(scores, keys, torch.full((8,), step, device=keys.device)).tolist())
    return tokens


def test_tokens_are_bit_identical_to_the_recorded_sampler():
    assert _decode(_seeded_decode_inputs()) == RECORDED_TOKENS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_recorded_tokens_without_a_host_sync():
    inputs = _seeded_decode_inputs("cuda")
    assert _decode(inputs) == RECORDED_TOKENS
    logits, seen, *settings, keys = inputs
    steps = torch.zeros(8, dtype=torch.long, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        sample(process_logits(logits[0], seen, *settings, 1000), keys, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_step_reads_no_value_on_the_host_and_rebuilds_no_constant():
    """No value read on the host, no value-dependent shape (``HOST_READS``): a CUDA graph allows
    neither. The vocabulary hash keys come from the cache, so no step runs ``arange``."""
    logits, seen, *settings, keys = _seeded_decode_inputs()
    steps = torch.full((8,), 3)
    sample(process_logits(logits[0], seen, *settings, 1000), keys, steps)  # fills the cache
    with OpLog() as log:
        sample(process_logits(logits[0], seen, *settings, 1000), keys, steps)
    assert log.ops and not (HOST_READS | {"arange"}) & log.op_names()
    assert index_keys(torch.device("cpu"), 6563) is index_keys(torch.device("cpu"), 6563)


def test_a_step_runs_on_the_meta_device():
    """Meta tensors have shapes but no values: reading one, or a value-dependent shape, raises."""
    logits, seen, *settings, keys = _seeded_decode_inputs("meta")
    scores = process_logits(logits[0], seen, *settings, 1000)
    tokens = sample(scores, keys, torch.zeros(8, dtype=torch.long, device="meta"))
    assert tokens.shape == (8,) and tokens.dtype == torch.long
