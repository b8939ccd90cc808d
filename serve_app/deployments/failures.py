"""The model replica's failure policy over the engine's `isolate_failures`: a chunk that does not
fit even alone fails with our ChunkOutOfMemoryError (503 `out_of_memory`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from chatterbox.engine.outcomes import is_cuda_error, isolate_failures
from serve_app.errors import ChunkOutOfMemoryError

__all__ = ["CHUNK_OUT_OF_MEMORY", "Item", "Out", "is_cuda_error", "run_bisecting"]

Item = TypeVar("Item")
Out = TypeVar("Out")

CHUNK_OUT_OF_MEMORY = (
    "a chunk does not fit in accelerator memory even alone; lower "
    "chunking.max_chunk_chars or give each model replica more memory"
)


def _chunk_too_big() -> Exception:
    return ChunkOutOfMemoryError(CHUNK_OUT_OF_MEMORY)


def run_bisecting(fn: Callable[[list[Item]], Sequence[Out]], items: list[Item]) -> list[Out | Exception]:
    """`isolate_failures(fn, items)`, a chunk too big even alone failing with ChunkOutOfMemoryError."""
    return isolate_failures(fn, items, too_big=_chunk_too_big)
