"""ConditionalDecoder: the mean-flow velocity estimator of S3Gen's flow decoder (turbo-spec 5.5).

A 1-D U-Net at the full mel rate: one down level, 12 mid blocks, one up level, each a causal
resnet block followed by transformer blocks. Convolutions are causal and every conv input is
multiplied by the frame mask; attention is bidirectional with a key-padding bias. So right-padded
rows reproduce their unbatched values on valid frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import HEAD_DIM, S3GEN_MEL_BINS
from chatterbox.weights import count_indexed

MASKED_SCORE = -1.0e10  # additive attention bias on padded keys (the reference's value)


@dataclass
class EstimatorConfig:
    in_channels: int = 320  # [x, mu, speaker, cond] x 80 mel bins; also the time-embedding width
    channels: int = 256
    time_dim: int = 1024
    attention_width: int = 512  # heads x 64
    transformers_per_block: int = 4
    mid_blocks: int = 12

    @property
    def heads(self) -> int:
        return self.attention_width // HEAD_DIM

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> EstimatorConfig:
        """``sd`` holds the keys under ``flow.decoder.estimator.``."""
        time_dim, in_channels = sd["time_mlp.linear_1.weight"].shape
        return cls(
            in_channels=in_channels,
            channels=sd["final_proj.weight"].shape[1],
            time_dim=time_dim,
            attention_width=sd["down_blocks.0.1.0.attn1.to_q.weight"].shape[0],
            transformers_per_block=count_indexed(sd, "down_blocks.0.1."),
            mid_blocks=count_indexed(sd, "mid_blocks."),
        )


def time_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal embedding of flow times t (N,) in [0, 1] (scaled by 1000) -> (N, width) float32."""
    half = width // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = 1000 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_channels: int, time_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class CausalConv1d(nn.Conv1d):
    """Conv1d with kernel-1 zeros on the left: output frame n sees input frames n-k+1 .. n."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CausalBlock(nn.Module):
    """mask -> causal conv (k3) -> channel LayerNorm -> Mish -> mask."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        # Indices 0 and 2 are the checkpoint's names (1 and 3 were transposes in the reference).
        self.block = nn.ModuleDict({"0": CausalConv1d(c_in, c_out, 3), "2": ChannelLayerNorm(c_out)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.block["2"](self.block["0"](x * mask))
        return F.mish(h) * mask


class CausalResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, c_out))
        self.block1 = CausalBlock(c_in, c_out)
        self.block2 = CausalBlock(c_out, c_out)
        self.res_conv = nn.Conv1d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, T), mask (B, 1, T), t_emb (1 or B, time_dim) -> (B, C_out, T)."""
        h = self.block1(x, mask) + self.mlp(t_emb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)


class Attention(nn.Module):
    def __init__(self, width: int, attention_width: int) -> None:
        super().__init__()
        self.heads = attention_width // HEAD_DIM
        self.to_q = nn.Linear(width, attention_width, bias=False)
        self.to_k = nn.Linear(width, attention_width, bias=False)
        self.to_v = nn.Linear(width, attention_width, bias=False)
        self.to_out = nn.Sequential(nn.Linear(attention_width, width))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), key_bias (B, 1, 1, T) additive -> (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, self.heads, HEAD_DIM).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
        return self.to_out(out.transpose(1, 2).reshape(B, T, -1))


class GELUProjection(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        # Index 1 is the checkpoint layout's dropout slot (no parameters, inactive at inference).
        self.net = nn.Sequential(GELUProjection(width, 4 * width), nn.Identity(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU FFN, on (B, T, C)."""

    def __init__(self, width: int, attention_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn1 = Attention(width, attention_width)
        self.norm3 = nn.LayerNorm(width)
        self.ff = FeedForward(width)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), key_bias)
        return x + self.ff(self.norm3(x))


class ConditionalDecoder(nn.Module):
    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        self.config = config
        c, td = config.channels, config.time_dim

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(c, config.attention_width) for _ in range(config.transformers_per_block)
            )

        self.time_mlp = TimestepMLP(config.in_channels, td)
        self.time_embed_mixer = nn.Linear(2 * td, td, bias=False)
        self.down_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [CausalResnetBlock(config.in_channels, c, td), transformers(), CausalConv1d(c, c, 3)]
                )
            ]
        )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock(c, c, td), transformers()]) for _ in range(config.mid_blocks)
        )
        self.up_blocks = nn.ModuleList(
            [nn.ModuleList([CausalResnetBlock(2 * c, c, td), transformers(), CausalConv1d(c, c, 3)])]
        )
        self.final_block = CausalBlock(c, c)
        self.final_proj = nn.Conv1d(c, S3GEN_MEL_BINS, 1)

    def embed_times(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Mean-flow interval [t, r] (each (N,)) -> (N, time_dim) in the module's dtype."""
        dtype = self.final_proj.weight.dtype
        t_emb = self.time_mlp(time_embedding(t, self.config.in_channels).to(dtype))
        r_emb = self.time_mlp(time_embedding(r, self.config.in_channels).to(dtype))
        return self.time_embed_mixer(torch.cat([t_emb, r_emb], dim=1))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t_emb: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Average velocity over the interval embedded in t_emb.

        x, mu, cond (B, 80, T); mask (B, 1, T) 1.0 on valid frames; t_emb (1 or B, time_dim);
        spks (B, 80) -> (B, 80, T), zero on padded frames.
        """
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)
        key_bias = ((1.0 - mask) * MASKED_SCORE).unsqueeze(1)  # (B, 1, 1, T)

        def run(resnet: nn.Module, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = resnet(h, mask, t_emb).transpose(1, 2)
            for block in blocks:
                h = block(h, key_bias)
            return h.transpose(1, 2)

        resnet, blocks, conv = self.down_blocks[0]
        skip = run(resnet, blocks, h)
        h = conv(skip * mask)
        for resnet, blocks in self.mid_blocks:
            h = run(resnet, blocks, h)
        resnet, blocks, conv = self.up_blocks[0]
        h = run(resnet, blocks, torch.cat([h, skip], dim=1))
        h = conv(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask
