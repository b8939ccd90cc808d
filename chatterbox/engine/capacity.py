"""How big a KV cache the device can hold: free memory, the allocation, and the error naming one that fits."""

from __future__ import annotations

import contextlib
import os

import torch

from chatterbox.engine.kv_cache import SlotCache
from chatterbox.t3.gpt2 import GPT2Config

CAPACITY_HEADROOM = 0.9  # share of free memory a suggested cache may take


class EngineCapacityError(RuntimeError):
    """The KV cache does not fit in memory; the message names a capacity that would."""


def allocate_cache(
    config: GPT2Config, slots: int, positions: int, dtype: torch.dtype, device: torch.device
) -> SlotCache:
    """The slot cache, or EngineCapacityError naming a capacity that fits the free memory."""
    needed = SlotCache.nbytes_for(config, slots, positions, dtype)
    free = free_memory(device)
    if needed <= free:
        try:
            return SlotCache(config, slots, positions, dtype, device)
        except RuntimeError as error:  # torch.OutOfMemoryError, or the CPU allocator's refusal
            raise EngineCapacityError(capacity_message(config, slots, positions, dtype, free)) from error
    raise EngineCapacityError(capacity_message(config, slots, positions, dtype, free))


def capacity_message(config: GPT2Config, slots: int, positions: int, dtype: torch.dtype, free: int) -> str:
    per_position = SlotCache.nbytes_for(config, 1, 1, dtype)
    usable = int(free * CAPACITY_HEADROOM)
    fitting_slots = usable // (per_position * positions)
    fitting_positions = usable // (per_position * slots)
    gib = 2**30
    message = (
        f"a KV cache of max_slots={slots} x max_positions={positions} ({dtype}) needs "
        f"{per_position * slots * positions / gib:.2f} GiB, but {free / gib:.2f} GiB is free"
    )
    if fitting_slots >= 1:
        message += f"; max_slots={fitting_slots} (at max_positions={positions})"
        if fitting_positions >= 2:
            message += f" or max_positions={fitting_positions} (at max_slots={slots})"
        return message + " would fit"
    return message + f"; not even max_slots=1 fits: try max_positions={usable // per_position}"


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation may take on the device (CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
