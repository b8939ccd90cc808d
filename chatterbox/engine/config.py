"""EngineConfig: a TurboEngine's capacity and switches, defined once (the Serve config embeds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 8  # rows of the fixed KV cache = most requests decoding at once
    max_positions: int | None = None  # cache length per row; None: the longest possible row
    prefix_cache_voices: int = 16  # voices whose prefix K/V is kept (LRU); 0 turns the cache off
    s3gen_max_batch: int = 8  # most rows (whole, or streamed hops) vocoded in one S3Gen call
    prefill_chunk_tokens: int | None = None  # most prefill positions per iteration (None: whole rows)
    # Decode steps replayed as CUDA graphs (engine/cuda_graphs.py; CUDA only, captured and
    # self-checked at construction). Off: no GPU has measured them yet.
    cuda_graphs: bool = False

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
