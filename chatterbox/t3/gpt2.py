"""GPT-2 backbone of T3 with a preallocated KV cache and per-row positions (turbo-spec 3.1-3.3).

Pre-LN blocks, learned absolute positions, ``gelu_new`` (tanh approximation), LayerNorm eps 1e-5,
64-wide heads. No token embedding: T3 feeds ``inputs_embeds`` of its own. Where keys and values
go is the ``CacheContext``'s business: for ``T3.generate`` rows of different lengths are
left-padded into shared cache slots, a key-validity mask hides each row's padding and
``positions`` restart at 0 on each row's first real token (``KVCache``, ``AttentionContext``); the
serving engine gives each request a cache row of its own (``t3/slots.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import HEAD_DIM
from chatterbox.weights import CheckpointError, count_indexed

# GPT-2 stores these projections as "Conv1D" weights [in, out]; nn.Linear wants [out, in].
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class GPT2Config:
    width: int
    layers: int
    positions: int = 8196
    eps: float = 1e-5

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> GPT2Config:
        """Dims of a backbone state dict with keys relative to the backbone (``wpe.weight``, ``h.0...``)."""
        if "wpe.weight" not in state_dict:
            raise CheckpointError("GPT-2 backbone: no 'wpe.weight' in the state dict")
        positions, width = state_dict["wpe.weight"].shape
        if width % HEAD_DIM:
            raise CheckpointError(f"GPT-2 backbone: width {width} is not a multiple of {HEAD_DIM}")
        return cls(width=width, layers=count_indexed(state_dict, "h."), positions=positions)


def linear_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone state dict with every GPT-2 Conv1D weight transposed into nn.Linear layout."""
    return {key: value.t() if key.endswith(CONV1D_WEIGHTS) else value for key, value in state_dict.items()}


class KVCache(nn.Module):
    """Keys and values of every layer, allocated once and written in place.

    Buffers are (layers, batch, heads, max_len, head_dim): layer-major, so one layer's slice is a
    contiguous (batch, heads, max_len, head_dim) block for SDPA. ``batch`` is the number of live
    rows; ``keep_rows`` packs surviving rows to the front so finished rows stop costing compute.
    """

    def __init__(
        self, config: GPT2Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        shape = (config.layers, batch, config.heads, max_len, HEAD_DIM)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.batch = batch

    def update(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at cache ``slots`` (T,); return the first ``kv_len`` slots (B, H, S, D)."""
        k_layer = self.k[layer, : self.batch]
        v_layer = self.v[layer, : self.batch]
        k_layer.index_copy_(2, slots, k)
        v_layer.index_copy_(2, slots, v)
        return k_layer[:, :, :kv_len], v_layer[:, :, :kv_len]

    def keep_rows(self, rows: list[int], used_len: int) -> None:
        """Move ``rows`` (ascending) to the front, in place; only the first ``used_len`` slots matter."""
        for dst, src in enumerate(rows):
            if dst != src:  # src > dst, so a source is never overwritten before it is read
                self.k[:, dst, :, :used_len].copy_(self.k[:, src, :, :used_len])
                self.v[:, dst, :, :used_len].copy_(self.v[:, src, :, :used_len])
        self.batch = len(rows)


class CacheContext(Protocol):
    """Where one forward's new keys and values go and what its queries may attend to.

    Built once per forward and shared by every layer (as gpt-fast passes ``input_pos`` and a mask).
    ``AttentionContext`` serves one left-padded batch (``T3.generate``); ``SlotContext``
    (``t3/slots.py``) serves the engine's slot cache, where each row writes at its own positions.
    """

    mask: torch.Tensor  # (B, 1, T, kv_len): bool (True = may attend) or additive float

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer``'s new k, v (B, H, T, D); return the keys and values to attend to
        (B, H, kv_len, D)."""
        ...


@dataclass(frozen=True)
class AttentionContext:
    """Where one forward's T new positions go in a ``KVCache`` and what they may attend to.

    ``slots`` (T,) int64 are the cache slots the T positions are written to (shared by all rows);
    attention reads the first ``kv_len`` slots under ``mask`` (B, 1, T, kv_len) bool, True = may attend.
    """

    cache: KVCache
    slots: torch.Tensor
    kv_len: int
    mask: torch.Tensor

    @classmethod
    def causal(
        cls, cache: KVCache, slots: torch.Tensor, key_valid: torch.Tensor, kv_len: int
    ) -> AttentionContext:
        """Causal attention over the valid keys: key_valid (B, >= kv_len) bool is False on each
        row's left padding; kv_len may be any value above the last written slot (e.g. the whole
        cache for a static-shape graph)."""
        key_slots = torch.arange(kv_len, device=slots.device)
        causal = key_slots[None, :] <= slots[:, None]  # (T, kv_len)
        mask = key_valid[:, None, None, :kv_len] & causal  # (B, 1, T, kv_len)
        # A padding query has no valid key; letting it see its own slot keeps softmax finite.
        # Its output is never read, and real rows never attend to padding slots.
        mask = mask | (key_slots[None, :] == slots[:, None])
        return cls(cache, slots, kv_len, mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(layer, self.slots, k, v, self.kv_len)


class Attention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.heads = config.heads
        self.c_attn = nn.Linear(config.width, 3 * config.width)
        self.c_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, context: CacheContext, layer: int) -> torch.Tensor:
        """x (B, T, W) -> (B, T, W); writes this layer's keys and values into the context's cache."""
        B, T, W = x.shape
        q, k, v = self.c_attn(x).split(W, dim=2)
        q, k, v = (t.view(B, T, self.heads, HEAD_DIM).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        k, v = context.update(layer, k, v)  # (B, H, kv_len, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=context.mask)  # scale 1/sqrt(64)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, W))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.width, 4 * config.width)
        self.c_proj = nn.Linear(4 * config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # gelu_new


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, context: CacheContext, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), context, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Parameter names follow the official checkpoint under ``tfmr.`` (minus the unused ``wte``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wpe = nn.Embedding(config.positions, config.width)
        self.h = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, context: CacheContext) -> torch.Tensor:
        """Run T new positions per row, reading and extending the context's cache.

        embeds (B, T, W); positions (B, T) int64 per-row position ids. Returns the final-LayerNorm
        hidden states (B, T, W).
        """
        x = embeds + self.wpe(positions)
        for layer, block in enumerate(self.h):
            x = block(x, context, layer)
        return self.ln_f(x)
