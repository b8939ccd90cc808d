"""Per-row logits processing and seeded sampling, as pure tensor functions (turbo-spec 3.4).

Processors follow the reference order and HF semantics, each row with its own settings:
temperature -> top-k -> top-p -> repetition penalty. Sampling is Gumbel-max over counter-based
noise, a hash of (row seed, step, vocabulary index) computed on the device: a seeded row draws the
same tokens alone or in any batch, with no host sync. No value is read on the host and no shape
depends on one (tests run both on the meta device), so a sampling decode step can be a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**31, so products of 32-bit values stay inside int64
_STEP_SALT = 0x9E3779B9
_INDEX_SALT = 0x7F4A7C15
NOISE_BITS = 23  # random bits per uniform draw: float32 holds (k + 0.5) / 2**23 exactly


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    x = ((x ^ (x >> 16)) * _HASH_MULTIPLIER) & MASK32
    x = ((x ^ (x >> 16)) * _HASH_MULTIPLIER) & MASK32
    return x ^ (x >> 16)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """(B,) int64 seeds in [0, 2**63) -> (B,) 32-bit row keys."""
    return mix32(mix32(seeds & MASK32) ^ (seeds >> 32))


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise (B, vocab) float32, a pure function of (key, step, vocabulary index).

    keys (B,) 32-bit row keys; steps (B,) int64, how many tokens the row has sampled so far.
    """
    step_keys = mix32(keys ^ mix32((steps + _STEP_SALT) & MASK32))  # (B,)
    bits = mix32(step_keys[:, None] ^ index_keys(keys.device, vocab)[None, :]) >> (32 - NOISE_BITS)  # (B, V)
    return gumbel_from_bits(bits)


@functools.cache
def index_keys(device: torch.device, vocab: int) -> torch.Tensor:
    """(V,) int64 hash keys of the vocabulary indices, computed once per device and size.

    Built outside inference mode so the cached tensor is usable in and out of it. A CUDA graph
    must not be the first caller (its capture would own the memory): warm-up runs populate it.
    """
    with torch.inference_mode(False):
        return mix32(torch.arange(vocab, device=device) + _INDEX_SALT)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from ``NOISE_BITS``-bit integers; always finite, in about [-2.8, 16.6].

    ``(bits + 0.5) / 2**23`` is exact in float32 and strictly inside (0, 1). (With 24 bits the
    largest value rounds to 1.0, the noise becomes +inf, and a filtered -inf score turns into a
    NaN that argmax picks: a token top-k had removed.)
    """
    uniform = (bits.float() + 0.5) / 2**NOISE_BITS
    return -torch.log(-torch.log(uniform))


def process_logits(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor,
    candidates: int,
) -> torch.Tensor:
    """Apply temperature, top-k, top-p and repetition penalty per row; filtered entries become -inf.

    logits (B, V) float32; seen (B, V) bool, the ids the repetition penalty applies to;
    temperature, top_p, repetition_penalty (B,) float32; top_k (B,) int64 >= 1; candidates: a
    host-side bound on top_k (the batch's largest), so only that many scores per row are sorted.
    A top_p of 1 disables top-p for that row, as HF skips the processor then. (Only if the k-th
    score is tied beyond ``candidates`` places would the tied extras miss top-p's normalisation.)
    """
    scores = logits / temperature[:, None]
    top_scores, top_ids = scores.topk(min(candidates, scores.shape[-1]), dim=-1)  # descending
    k = top_k.clamp(max=top_scores.shape[-1])[:, None]
    kth_score = top_scores.gather(1, k - 1)
    remove_top = top_scores < kth_score  # ties with the k-th score are kept, as in HF
    # Top-p over the top-k survivors, as HF computes it: cumulative softmax in ascending order,
    # drop where it is <= 1 - p, always keep the most likely token.
    ascending = top_scores.masked_fill(remove_top, float("-inf")).flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove_ascending = cumulative <= (1 - top_p)[:, None]
    remove_ascending[:, -1] = False
    remove_ascending &= (top_p < 1)[:, None]
    remove = (scores < kth_score).scatter_(1, top_ids, remove_top | remove_ascending.flip(-1))
    scores = scores.masked_fill(remove, float("-inf"))
    # HF repetition penalty: once per distinct seen id, shrinking positive and growing negative scores.
    penalty = repetition_penalty[:, None]
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def sample(scores: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Draw one id per row from softmax(scores) by Gumbel-max: (B, V) -> (B,) int64."""
    return (scores + gumbel_noise(keys, steps, scores.shape[-1])).argmax(dim=-1)
