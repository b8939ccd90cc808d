"""EngineConfig: a TurboEngine's capacity and switches, defined once (the Serve config embeds it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from chatterbox.constants import TOKEN_HZ
from chatterbox.s3gen.streaming import HopSchedule

# The slowest plausible reading pace in GPT-2 text tokens per second: ~85 words a minute (about 8
# characters a second) at ~1.4 tokens per English word, half the usual narration pace (~150).
SLOWEST_TEXT_TOKENS_PER_S = 2.0


@dataclass(frozen=True)
class TokenCap:
    """The most speech tokens a row may draw for its text: ``per_text_token * text_tokens + extra``.

    A guard against a missed STOP (the real model sometimes runs on as hiss to the token limit), so
    that it costs seconds, not the 40 s of ``max_new_tokens``, which stays the hard ceiling. Turbo
    speaks 25 speech tokens a second; at the slowest plausible pace that is 12.5 per text token.
    ``extra`` (2 s) covers the leading and trailing silence, a tag's laugh or sigh, and texts of a
    word or two. Rows that ignore STOP (benchmarks) run to their limit: the cap guards only a STOP
    that is looked for.
    """

    per_text_token: float = TOKEN_HZ / SLOWEST_TEXT_TOKENS_PER_S
    extra: int = 2 * TOKEN_HZ

    def __post_init__(self) -> None:
        per = self.per_text_token
        if isinstance(per, bool) or not isinstance(per, int | float) or not math.isfinite(per) or per <= 0:
            raise ValueError(f"TokenCap.per_text_token must be a finite number > 0, got {per!r}")
        # A row's first draw never stops it (a first STOP does not count), so the cap allows two.
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 2:
            raise ValueError(f"TokenCap.extra must be an integer >= 2, got {self.extra!r}")

    def tokens(self, text_tokens: int) -> int:
        """Draws allowed for a text of ``text_tokens`` tokens."""
        return math.ceil(self.per_text_token * text_tokens) + self.extra


DEFAULT_TOKEN_CAP = TokenCap()
DEFAULT_HOP_SCHEDULE = HopSchedule()


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # rows of the fixed KV cache = most requests decoding at once
    max_positions: int | None = None  # cache length per row; None: the longest possible row
    prefix_cache_voices: int = 16  # voices whose prefix K/V is kept (LRU); 0 turns the cache off
    # Most rows (whole, or streamed hops) vocoded in one S3Gen call. None: max_slots on CUDA; 1 on
    # the CPU, where S3Gen is compute-bound and batching gains nothing (docs/benchmarks.md), and
    # where a row vocoded alone gives the same samples whatever else is in flight.
    s3gen_max_batch: int | None = None
    prefill_chunk_tokens: int | None = None  # most prefill positions per iteration (None: whole rows)
    # Decode steps replayed as CUDA graphs (engine/cuda_graphs.py; CUDA only, captured and
    # self-checked at construction). Off: no GPU has measured them yet.
    cuda_graphs: bool = False
    token_cap: TokenCap | None = DEFAULT_TOKEN_CAP  # None: max_new_tokens alone
    # How streamed requests are cut into hops. The first hop goes down to 4 tokens (first audio
    # after 7 decode steps) with overlap_frames <= 7, e.g. HopSchedule(first_hop=4, overlap_frames=4):
    # a hop holds its overlap back, and 4 tokens are 8 mel frames (docs/streaming.md).
    hop_schedule: HopSchedule = DEFAULT_HOP_SCHEDULE

    def __post_init__(self) -> None:
        minimums = {
            "max_slots": (self.max_slots, 1),
            "max_positions": (self.max_positions, 2),
            "prefix_cache_voices": (self.prefix_cache_voices, 0),
            "s3gen_max_batch": (self.s3gen_max_batch, 1),
            "prefill_chunk_tokens": (self.prefill_chunk_tokens, 1),
        }
        for name, (value, minimum) in minimums.items():
            integer = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and (not integer or value < minimum):
                raise ValueError(f"EngineConfig.{name} must be an integer >= {minimum}, got {value!r}")
