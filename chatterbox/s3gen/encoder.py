"""UpsampleConformerEncoder: speech-token embeddings (25 Hz) -> mel-rate hidden states (50 Hz).

Layout (turbo-spec 5.4): embed (Linear, LayerNorm, x*sqrt(d), relative positions) -> pre-lookahead
convs (3 tokens of right context) -> conformer layers -> nearest x2 upsample + causal conv ->
up_embed -> up conformer layers -> after_norm. Attention is bidirectional with a key-padding mask,
so right-padded batches reproduce each row's unbatched result once the padded frames are zeroed
before the (non-causal) lookahead conv.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import HEAD_DIM, S3GEN_MEL_FRAMES_PER_TOKEN
from chatterbox.weights import count_indexed

PRE_LOOKAHEAD_TOKENS = 3


@dataclass
class EncoderConfig:
    width: int = 512
    ffn: int = 2048
    blocks: int = 6
    up_blocks: int = 4

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> EncoderConfig:
        """``sd`` holds the keys under ``flow.encoder.``."""
        return cls(
            width=sd["after_norm.weight"].shape[0],
            ffn=sd["encoders.0.feed_forward.w_1.weight"].shape[0],
            blocks=count_indexed(sd, "encoders."),
            up_blocks=count_indexed(sd, "up_encoders."),
        )


def relative_position_table(length: int, width: int) -> torch.Tensor:
    """Sinusoidal encodings of the relative offsets ``length-1, ..., 0, ..., -(length-1)``.

    Returns (2*length-1, width) float32; row ``length-1`` is offset 0 (ESPnet's "new" rel-pos layout).
    """
    offsets = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * -(math.log(10000.0) / width))
    table = torch.empty(2 * length - 1, width)
    table[:, 0::2] = torch.sin(offsets * inv_freq)
    table[:, 1::2] = torch.cos(offsets * inv_freq)
    return table


class LinearEmbed(nn.Module):
    """Linear -> LayerNorm -> scale by sqrt(width); also returns the relative-position table."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width, eps=1e-5))
        self.scale = math.sqrt(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (B, T, D) and pos_emb (2T-1, D) in x's dtype."""
        pos_emb = relative_position_table(x.shape[1], x.shape[2]).to(x.device, x.dtype)
        return self.out(x) * self.scale, pos_emb


class PreLookahead(nn.Module):
    """Residual conv pair that lets each token see the next 3 tokens (conv1) and the past 2 (conv2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, PRE_LOOKAHEAD_TOKENS + 1)
        self.conv2 = nn.Conv1d(width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) with padded frames already zero -> (B, T, D)."""
        h = F.pad(x.transpose(1, 2), (0, PRE_LOOKAHEAD_TOKENS))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class RelPositionAttention(nn.Module):
    """Transformer-XL style attention: score(i, j) = [(q_i+u)·k_j + (q_i+v)·p(i-j)] / sqrt(d_k)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = width // HEAD_DIM
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(width, width)
        self.linear_v = nn.Linear(width, width)
        self.linear_out = nn.Linear(width, width)
        self.linear_pos = nn.Linear(width, width, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.heads, HEAD_DIM))
        self.pos_bias_v = nn.Parameter(torch.empty(self.heads, HEAD_DIM))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), key_padding (B, 1, 1, T) True at padded keys, pos_emb (2T-1, D) -> (B, T, D)."""
        B, T, D = x.shape
        q = self.linear_q(x).view(B, T, self.heads, HEAD_DIM)
        k = self.linear_k(x).view(B, T, self.heads, HEAD_DIM).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.heads, HEAD_DIM).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(2 * T - 1, self.heads, HEAD_DIM).transpose(0, 1)  # (H, 2T-1, d)
        # Position scores for every (query, offset): one (H, B*T, d) x (H, d, 2T-1) product.
        q_v = (q + self.pos_bias_v).permute(2, 0, 1, 3).reshape(self.heads, B * T, HEAD_DIM)
        position = torch.matmul(q_v, p.transpose(1, 2)).view(self.heads, B, T, 2 * T - 1)
        # Row i lists offsets T-1 .. -(T-1); offset i-j sits at column (T-1) - i + j, so the (T, T)
        # view starts at column T-1 and steps one column left per row.
        s = position.stride()
        position = position.as_strided(
            (self.heads, B, T, T), (s[0], s[1], s[2] - 1, 1), position.storage_offset() + T - 1
        )
        bias = (position.transpose(0, 1) / math.sqrt(HEAD_DIM)).masked_fill(key_padding, -math.inf)
        # softmax(((q+u)·k + position) / sqrt(d)) v, the content term inside the fused kernel.
        out = F.scaled_dot_product_attention((q + self.pos_bias_u).transpose(1, 2), k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, width: int, ffn: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(width, ffn)
        self.w_2 = nn.Linear(ffn, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm self-attention + FFN (the conformer's conv module and macaron FFN are unused)."""

    def __init__(self, width: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(width)
        self.feed_forward = FeedForward(width, ffn)
        self.norm_mha = nn.LayerNorm(width, eps=1e-12)
        self.norm_ff = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), key_padding, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class UpsampleConv(nn.Module):
    """Nearest x2 upsampling followed by a causal conv (kernel 5, left zero padding 4)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 2 * S3GEN_MEL_FRAMES_PER_TOKEN + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, 2T, D)."""
        h = x.transpose(1, 2).repeat_interleave(S3GEN_MEL_FRAMES_PER_TOKEN, dim=2)
        return self.conv(F.pad(h, (2 * S3GEN_MEL_FRAMES_PER_TOKEN, 0))).transpose(1, 2)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        width, ffn = config.width, config.ffn
        self.embed = LinearEmbed(width)
        self.pre_lookahead_layer = PreLookahead(width)
        self.encoders = nn.ModuleList(ConformerLayer(width, ffn) for _ in range(config.blocks))
        self.up_layer = UpsampleConv(width)
        self.up_embed = LinearEmbed(width)
        self.up_encoders = nn.ModuleList(ConformerLayer(width, ffn) for _ in range(config.up_blocks))
        self.after_norm = nn.LayerNorm(width, eps=1e-5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) token embeddings (zero at padded positions), lengths (B,) -> (B, 2T, D).

        Frames at or beyond ``2 * lengths`` are padding and hold unspecified values.
        """
        T = x.shape[1]
        valid = torch.arange(T, device=x.device) < lengths[:, None]  # (B, T)
        x, pos_emb = self.embed(x)
        # The lookahead conv reads 3 frames past each token: zero the padding so the last real
        # tokens see the same zeros as in an unbatched call.
        x = self.pre_lookahead_layer(x * valid.unsqueeze(-1).to(x.dtype))
        key_padding = ~valid[:, None, None, :]
        for layer in self.encoders:
            x = layer(x, key_padding, pos_emb)

        x = self.up_layer(x)
        key_padding = key_padding.repeat_interleave(S3GEN_MEL_FRAMES_PER_TOKEN, dim=-1)
        x, pos_emb = self.up_embed(x)
        for layer in self.up_encoders:
            x = layer(x, key_padding, pos_emb)
        return self.after_norm(x)
