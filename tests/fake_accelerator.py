"""A fake accelerator whose memory frees itself as CUDA tensors do: it proves a retry runs only
after the failed attempt's memory is back (no model, no device needed)."""

from __future__ import annotations

import weakref

import torch


class FakeAccelerator:
    """Memory of `capacity` units, each block freed when nothing references it any more (as a CUDA
    tensor is), running out of memory like CUDA. Records the memory in use when each attempt starts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.in_use_at_start: list[int] = []

    def allocate(self, units: int) -> object:
        if self.in_use + units > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {units} more units, {self.in_use} in use")
        self.in_use += units
        block = object.__new__(type("Block", (), {}))
        weakref.finalize(block, self._free, units)
        return block

    def _free(self, units: int) -> None:
        self.in_use -= units


def generate_on(accelerator: FakeAccelerator, reraise_in_handler: bool):
    """A generate-like function: a KV cache of one unit per item, then activations as large again."""

    def generate(items: list) -> list[str]:
        accelerator.in_use_at_start.append(accelerator.in_use)
        kv_cache = [accelerator.allocate(1) for _ in items]
        try:
            activations = accelerator.allocate(len(items))
        except torch.cuda.OutOfMemoryError as error:
            if not reraise_in_handler:
                raise
            # A local that outlives its handler (as in retry loops that keep the last error) makes
            # a reference cycle, frame -> error -> traceback -> frame, that only gc frees.
            last_error = error
            raise torch.cuda.OutOfMemoryError("while allocating activations") from last_error
        assert kv_cache and activations
        return [f"audio:{item}" for item in items]

    return generate
