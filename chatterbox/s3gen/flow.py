"""Flow: speech tokens + speaker + prompt mel -> 80-bin mel at 50 Hz (turbo-spec 5.3 and 5.5).

Token embeddings go through the upsampling conformer encoder, are projected to 80 bins (``mu``),
and a two-step mean-flow sampler (t = 0 -> 0.5 -> 1) integrates the estimator's average velocity
from noise (t = 0) to mel (t = 1), conditioned on ``mu``, the speaker vector and the prompt mel.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import S3GEN_MEL_BINS, S3GEN_MEL_FRAMES_PER_TOKEN
from chatterbox.s3gen.encoder import EncoderConfig, UpsampleConformerEncoder
from chatterbox.s3gen.estimator import ConditionalDecoder, EstimatorConfig
from chatterbox.weights import subdict

MEAN_FLOW_STEPS = 2


@dataclass
class FlowConfig:
    vocab_size: int
    xvector_dim: int
    encoder: EncoderConfig
    estimator: EstimatorConfig

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> FlowConfig:
        """``sd`` holds the keys under ``flow.``."""
        return cls(
            vocab_size=sd["input_embedding.weight"].shape[0],
            xvector_dim=sd["spk_embed_affine_layer.weight"].shape[1],
            encoder=EncoderConfig.from_state_dict(subdict(sd, "encoder.")),
            estimator=EstimatorConfig.from_state_dict(subdict(sd, "decoder.estimator.")),
        )


class MeanFlowSampler(nn.Module):
    """Euler steps of the learned average velocity: x <- x + (r - t) * u(x, [t, r])."""

    def __init__(self, estimator: ConditionalDecoder) -> None:
        super().__init__()
        self.estimator = estimator
        # Same call as ``estimator``, compiled over length buckets (``S3Gen.compile``); None: eager.
        self.compiled: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        noise: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        steps: int = MEAN_FLOW_STEPS,
    ) -> torch.Tensor:
        """noise, mu, cond (B, 80, T); mask (B, 1, T); spks (B, 80) -> sample (B, 80, T) at t = 1."""
        times = torch.linspace(0, 1, steps + 1, device=noise.device)
        estimate = self.compiled or self.estimator
        x = noise
        for t, r in itertools.pairwise(times):
            t_emb = self.estimator.embed_times(t[None], r[None])  # (1, time_dim), shared by all rows
            x = x + (r - t).to(x.dtype) * estimate(x, mask, mu, t_emb, spks, cond)
        return x


class Flow(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        width = config.encoder.width
        self.input_embedding = nn.Embedding(config.vocab_size, width)
        self.spk_embed_affine_layer = nn.Linear(config.xvector_dim, S3GEN_MEL_BINS)
        self.encoder = UpsampleConformerEncoder(config.encoder)
        self.encoder_proj = nn.Linear(width, S3GEN_MEL_BINS)
        self.decoder = MeanFlowSampler(ConditionalDecoder(config.estimator))

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) right-padded prompt+speech ids, lengths (B,) -> (B, 2L, width)."""
        valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        x = self.input_embedding(tokens) * valid.unsqueeze(-1).to(self.input_embedding.weight.dtype)
        return self.encoder(x, lengths)

    def forward(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cond: torch.Tensor,
        xvectors: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Mel over every frame (prompt region included; callers slice out the speech frames).

        tokens (B, L) int64 right-padded, lengths (B,) valid tokens per row, cond (B, 80, 2L)
        prompt mel placed at each row's start (zeros elsewhere), xvectors (B, 192), noise
        (B, 80, 2L) starting point -> (B, 80, 2L) in the flow's dtype.
        """
        dtype = self.input_embedding.weight.dtype
        spks = self.spk_embed_affine_layer(F.normalize(xvectors.to(dtype), dim=1))
        mu = self.encoder_proj(self.encode(tokens, lengths)).transpose(1, 2)
        frames = torch.arange(mu.shape[-1], device=mu.device)
        mask = (frames < S3GEN_MEL_FRAMES_PER_TOKEN * lengths[:, None]).unsqueeze(1).to(dtype)  # (B, 1, 2L)
        return self.decoder(noise.to(dtype), mask, mu, spks, cond.to(dtype))
