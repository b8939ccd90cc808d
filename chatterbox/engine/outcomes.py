"""One outcome per item of a batch call: a failure stays with the items that cause it.

``isolate_failures`` serves every batched model call whose items are independent (voice
preparation in the Serve replica, the engine's vocoder stage). A retry always runs after the
``except`` block has ended and the failed attempt's traceback is dropped, so the failed batch's
activations and cache are freed before the smaller batches allocate theirs.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from chatterbox.errors import TTSInputError

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Out = TypeVar("Out")

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


def too_big_alone() -> Exception:
    return torch.cuda.OutOfMemoryError("one item does not fit in accelerator memory even alone")


def _detached(error: Exception) -> Exception:
    """error without its traceback or chained exceptions, whose frames would keep tensors alive."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)


def isolate_failures(
    fn: Callable[[list[Item]], Sequence[Out]],
    items: list[Item],
    too_big: Callable[[], Exception] = too_big_alone,
) -> list[Out | Exception]:
    """`fn(items)`, split up on failure until only the items that cause it fail.

    Returns one outcome per item: fn's result, or the exception that item alone raises (``too_big()``
    when it does not fit in accelerator memory even alone). Out-of-memory and bad input halve the
    batch; any other error retries the items one by one. Only a CUDA error propagates: the context
    is unusable, so no retry can succeed.
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
            return [too_big()]
        logger.warning(
            "CUDA out of memory at batch size %d; retrying as %d + %d", len(items), half, len(items) - half
        )
    elif len(items) == 1:
        return [failure]
    elif not isinstance(failure, TTSInputError):
        return [outcome for item in items for outcome in isolate_failures(fn, [item], too_big)]
    return isolate_failures(fn, items[:half], too_big) + isolate_failures(fn, items[half:], too_big)
