"""GPT-2 backbone of T3 with a preallocated KV cache and per-row positions (turbo-spec 3.1-3.3).

Pre-LN blocks, learned absolute positions, ``gelu_new`` (tanh approximation), LayerNorm eps 1e-5,
64-wide heads. No token embedding: T3 feeds ``inputs_embeds`` of its own. Where keys and values
go is the ``SlotContext``'s business (chatterbox/engine/kv_cache.py): each request has a cache row
of its own, its positions starting at 0 there; one context per forward is shared by every layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import HEAD_DIM
from chatterbox.weights import CheckpointError, count_indexed

if TYPE_CHECKING:
    from chatterbox.engine.kv_cache import SlotContext  # the engine's cache builds on GPT2Config

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


class Attention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.heads = config.heads
        self.c_attn = nn.Linear(config.width, 3 * config.width)
        self.c_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, context: SlotContext, layer: int) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, context: SlotContext, layer: int) -> torch.Tensor:
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

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, context: SlotContext) -> torch.Tensor:
        """Run T new positions per row, reading and extending the context's cache.

        embeds (B, T, W); positions (B, T) int64 per-row position ids. Returns the final-LayerNorm
        hidden states (B, T, W).
        """
        x = embeds + self.wpe(positions)
        for layer, block in enumerate(self.h):
            x = block(x, context, layer)
        return self.ln_f(x)
