"""The model replica's failure policy: which accelerator errors break a replica for good, and a
batch retried in halves (or item by item) until only the items that cause a failure fail."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from chatterbox.errors import TTSInputError
from serve_app.errors import ChunkOutOfMemoryError

logger = logging.getLogger("ray.serve")

Item = TypeVar("Item")
Out = TypeVar("Out")

CHUNK_OUT_OF_MEMORY = (
    "a chunk does not fit in accelerator memory even alone; lower "
    "chunking.max_chunk_chars or give each model replica more memory"
)


# torch >= 2.8 raises accelerator faults as AcceleratorError; older releases as a RuntimeError
# whose message names the CUDA error (the message test below covers those).
_ACCELERATOR_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in (getattr(torch, "AcceleratorError", None),) if error is not None
)


def is_cuda_error(error: BaseException) -> bool:
    """An accelerator error after which the CUDA context is unusable (out-of-memory is not one)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(error, _ACCELERATOR_ERRORS) or "CUDA error" in str(error)


def _detached(error: Exception) -> Exception:
    """error without its traceback or chained exceptions, whose frames would keep tensors alive."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)


def run_bisecting(fn: Callable[[list[Item]], Sequence[Out]], items: list[Item]) -> list[Out | Exception]:
    """`fn(items)`, split up on failure until only the items that cause it fail.

    Returns one outcome per item: fn's result, or the exception that item alone raises
    (ChunkOutOfMemoryError when it does not fit in accelerator memory even alone). Out-of-memory
    and bad input halve the batch; any other error retries the items one by one. Only a CUDA error
    propagates: the context is unusable, so no retry can succeed.
    """
    if not items:
        return []
    try:
        return list(fn(items))
    except torch.cuda.OutOfMemoryError:
        failure: Exception | None = None  # out of memory; keep nothing that holds the failed attempt
    except TTSInputError as error:
        failure = _detached(error)
    except Exception as error:
        if is_cuda_error(error):
            raise
        logger.warning("a batch of %d items failed", len(items), exc_info=True)
        failure = _detached(error)
    # Out of the handler: the exception, its traceback and the frames holding the failed attempt's
    # activations and KV cache are gone (gc for reference cycles), so the retry has that memory.
    half = len(items) // 2
    if failure is None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            return [ChunkOutOfMemoryError(CHUNK_OUT_OF_MEMORY)]
        logger.warning(
            "CUDA out of memory at batch size %d; retrying as %d + %d", len(items), half, len(items) - half
        )
    elif len(items) == 1:
        return [failure]
    elif not isinstance(failure, TTSInputError):
        return [outcome for item in items for outcome in run_bisecting(fn, [item])]
    return run_bisecting(fn, items[:half]) + run_bisecting(fn, items[half:])
