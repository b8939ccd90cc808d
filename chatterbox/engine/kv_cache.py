"""T3's one KV cache: fixed rows, one request per row, and a voice-prefix cache.

A ``SlotCache`` row belongs to one request at a time and holds its positions 0..len-1 at cache
positions 0..len-1: nothing is left-padded, so the keys and values of a voice's prefix
(``[speaker embedding | prompt tokens]``) are the same in every row and a ``PrefixCache`` can copy
them in instead of recomputing them. Rows of one decode step each write at their own position; an
additive float mask, built once per step from the rows' lengths and shared by every layer, hides
what lies past each row's end, so SDPA may pick a fused kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from chatterbox.constants import HEAD_DIM
from chatterbox.t3.gpt2 import GPT2Config


class SlotCache(nn.Module):
    """Keys and values of ``slots`` rows x ``positions`` positions for every layer, allocated once.

    Buffers are (layers, slots, heads, positions, head_dim). Live rows are kept packed at the
    front (``move_row``), so a decode step over B rows reads rows 0..B-1.
    """

    def __init__(
        self, config: GPT2Config, slots: int, positions: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        shape = (config.layers, slots, config.heads, positions, HEAD_DIM)
        # Zeros, not empty: a masked key still meets its value in softmax @ V, and 0 * NaN is NaN.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.slots = slots
        self.positions = positions

    @staticmethod
    def nbytes_for(config: GPT2Config, slots: int, positions: int, dtype: torch.dtype) -> int:
        """Bytes of keys and values for ``slots`` x ``positions`` (what the constructor allocates)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.layers * slots * config.heads * positions * HEAD_DIM * itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst`` (packing after a retire)."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])

    def read_prefix(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of row ``row``'s first ``length`` keys and values, each (layers, heads, length, D)."""
        return self.k[:, row, :, :length].clone(), self.v[:, row, :, :length].clone()

    def write_prefix(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (layers, heads, length, D) at row ``row``'s first positions."""
        length = k.shape[2]
        self.k[:, row, :, :length].copy_(k)
        self.v[:, row, :, :length].copy_(v)


@dataclass(frozen=True)
class SlotContext:
    """One forward over B consecutive cache rows from ``first_row``, T new positions each.

    ``write_positions`` (B, T) int64 are each row's own cache positions (= its position ids);
    attention reads the first ``kv_len`` positions under ``mask`` (B, 1, T, kv_len), additive float
    (0 = may attend, -inf = may not).
    """

    cache: SlotCache
    first_row: int
    write_positions: torch.Tensor
    kv_len: int
    mask: torch.Tensor

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.first_row + self.write_positions.shape[0])

    @classmethod
    def decode(cls, cache: SlotCache, lengths: torch.Tensor, kv_len: int, dtype: torch.dtype) -> SlotContext:
        """One new position per row for rows 0..B-1: lengths (B,) int64 is where each row writes
        (its length so far); kv_len > every length."""
        key_positions = torch.arange(kv_len, device=lengths.device)
        visible = key_positions[None, :] <= lengths[:, None]  # (B, kv_len)
        mask = torch.zeros(visible.shape, dtype=dtype, device=lengths.device).masked_fill_(
            ~visible, float("-inf")
        )
        return cls(cache, 0, lengths[:, None], kv_len, mask[:, None, None, :])  # mask (B, 1, 1, kv_len)

    @classmethod
    def prefill(
        cls, cache: SlotCache, row: int, start: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> SlotContext:
        """Positions start..start+length-1 of one row, causal over everything the row holds before."""
        positions = torch.arange(start, start + length, device=device)  # (T,)
        key_positions = torch.arange(start + length, device=device)
        visible = key_positions[None, :] <= positions[:, None]  # (T, kv_len)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        return cls(cache, row, positions[None], start + length, mask[None, None])  # mask (1, 1, T, kv_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_rows = self.cache.k[layer, self.rows]  # (B, H, positions, D)
        v_rows = self.cache.v[layer, self.rows]
        # Each row writes its T positions: scatter along the position dim with per-row indices.
        index = self.write_positions[:, None, :, None].expand_as(k)  # (B, H, T, D)
        k_rows.scatter_(2, index, k)
        v_rows.scatter_(2, index, v)
        return k_rows[:, :, : self.kv_len], v_rows[:, :, : self.kv_len]


class PrefixCache:
    """The prefix keys and values (1 + P positions) of the ``capacity`` most recently used voices.

    Not thread-safe: only the thread driving the ``DecodeBatch`` touches it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, voice_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The voice's prefix (k, v), each (layers, heads, 1 + P, D), marked most recent; None on a miss."""
        entry = self._entries.get(voice_id)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(voice_id)
        return entry

    def put(self, voice_id: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.capacity < 1:
            return
        # Detached: an entry lives as long as its voice is used, and must hold no autograd graph.
        self._entries[voice_id] = (k.detach(), v.detach())
        self._entries.move_to_end(voice_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def voice_ids(self) -> list[str]:
        """Cached voices, least recently used first."""
        return list(self._entries)
