"""T3: text tokens + voice conditioning -> speech-token logits (turbo-spec 3).

Each request's prefill row is ``[spkr_enc(speaker_emb), speech_emb(prompt), text_emb(text),
speech_emb(START)]``; ``prefix_embeds`` and ``text_embeds`` build its two parts, ``last_logits``
and ``decode_step`` run the backbone over a ``SlotContext`` of the engine's KV cache. Decoding
(batching, sampling, stopping) is the engine's ``DecodeBatch`` (chatterbox/engine/batch.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from chatterbox.constants import (
    SPEECH_VOCAB_SIZE,
    START_SPEECH_TOKEN,
    T3_PROMPT_TOKENS,
    T3_SPEECH_VOCAB_SIZE,
)
from chatterbox.sampling import SamplingParams
from chatterbox.t3.gpt2 import GPT2, GPT2Config, linear_layout
from chatterbox.weights import CheckpointError, load_strict, read_safetensors, require_keys, subdict

if TYPE_CHECKING:
    from chatterbox.engine.kv_cache import SlotContext  # the engine imports T3


@dataclass
class T3Request:
    text_tokens: torch.Tensor  # (Lt,) int64, Lt >= 1
    speaker_emb: torch.Tensor  # (S,) float, the voice-encoder embedding
    prompt_speech_tokens: torch.Tensor  # (P,) int64, 0 <= P <= 375, ids < 6561
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class T3Config:
    gpt2: GPT2Config
    text_vocab: int
    speaker_dim: int
    speech_vocab: int = T3_SPEECH_VOCAB_SIZE
    max_prompt_tokens: int = T3_PROMPT_TOKENS

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> T3Config:
        require_keys(state_dict, ("text_emb.weight", "speech_emb.weight", "cond_enc.spkr_enc.weight"), "T3")
        speech_vocab = state_dict["speech_emb.weight"].shape[0]
        if speech_vocab != T3_SPEECH_VOCAB_SIZE:
            raise CheckpointError(f"T3: speech vocabulary {speech_vocab}, expected {T3_SPEECH_VOCAB_SIZE}")
        return cls(
            gpt2=GPT2Config.from_state_dict(subdict(state_dict, "tfmr.")),
            text_vocab=state_dict["text_emb.weight"].shape[0],
            speaker_dim=state_dict["cond_enc.spkr_enc.weight"].shape[1],
        )


class CondEncoder(nn.Module):
    """Turbo's conditioning encoder: only the speaker projection (no CLAP, perceiver or emotion)."""

    def __init__(self, speaker_dim: int, width: int) -> None:
        super().__init__()
        self.spkr_enc = nn.Linear(speaker_dim, width)


class T3(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.config = config
        width = config.gpt2.width
        self.tfmr = GPT2(config.gpt2)
        self.cond_enc = CondEncoder(config.speaker_dim, width)
        self.text_emb = nn.Embedding(config.text_vocab, width)
        self.speech_emb = nn.Embedding(config.speech_vocab, width)
        self.speech_head = nn.Linear(width, config.speech_vocab)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> T3:
        """Strictly load the tensors of ``t3_turbo_v1.safetensors`` (float32 on CPU).

        ``tfmr.wte`` and ``text_head`` are unused at inference: their shapes are checked, then
        they are dropped.
        """
        config = T3Config.from_state_dict(state_dict)
        tensors = dict(state_dict)
        for unused in ("tfmr.wte.weight", "text_head.weight"):
            expected = (config.text_vocab, config.gpt2.width)
            if unused not in tensors or tuple(tensors[unused].shape) != expected:
                got = tuple(tensors[unused].shape) if unused in tensors else "missing"
                raise CheckpointError(f"T3: {unused} should have shape {expected}, got {got}")
            del tensors[unused]
        backbone = linear_layout(subdict(tensors, "tfmr."))
        tensors = {k: v for k, v in tensors.items() if not k.startswith("tfmr.")}
        tensors.update({f"tfmr.{k}": v for k, v in backbone.items()})
        with torch.device("meta"):  # skip random init: load_strict fills every tensor
            model = cls(config)
        model.to_empty(device="cpu")
        load_strict(model, tensors, "t3_turbo_v1.safetensors")
        return model.eval()

    @classmethod
    def from_file(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> T3:
        """Load ``t3_turbo_v1.safetensors``; the speech head stays float32 so logits are float32."""
        model = cls.from_state_dict(read_safetensors(path)).to(device=device, dtype=dtype)
        model.speech_head.float()
        return model

    @property
    def device(self) -> torch.device:
        return self.speech_head.weight.device

    def _check_request(self, index: int, request: T3Request, steps: int) -> None:
        """``steps``: how many tokens the request feeds after the prefill."""
        cfg = self.config
        where = f"request {index}"
        text, prompt, speaker = request.text_tokens, request.prompt_speech_tokens, request.speaker_emb
        if text.dim() != 1 or text.numel() == 0:
            raise ValueError(
                f"{where}: text_tokens must be a non-empty 1-D tensor, got shape {tuple(text.shape)}"
            )
        if text.dtype.is_floating_point or text.min() < 0 or text.max() >= cfg.text_vocab:
            raise ValueError(f"{where}: text token ids must be integers in [0, {cfg.text_vocab})")
        if speaker.shape != (cfg.speaker_dim,):
            raise ValueError(
                f"{where}: speaker_emb must have shape ({cfg.speaker_dim},), got {tuple(speaker.shape)}"
            )
        if prompt.dim() != 1:
            raise ValueError(f"{where}: prompt_speech_tokens must be 1-D, got shape {tuple(prompt.shape)}")
        if prompt.numel() > cfg.max_prompt_tokens:
            raise ValueError(
                f"{where}: prompt_speech_tokens has {prompt.numel()} tokens, at most {cfg.max_prompt_tokens}"
            )
        if prompt.numel() and (
            prompt.dtype.is_floating_point or prompt.min() < 0 or prompt.max() >= SPEECH_VOCAB_SIZE
        ):
            raise ValueError(f"{where}: prompt speech token ids must be integers in [0, {SPEECH_VOCAB_SIZE})")
        needed = self.prefill_len(request) + steps
        if needed > cfg.gpt2.positions:
            raise ValueError(
                f"{where}: text too long for the position table: 1 speaker + {prompt.numel()} prompt"
                f" + {text.numel()} text + 1 start + {steps} new tokens = {needed} positions,"
                f" the table has {cfg.gpt2.positions}"
            )

    @staticmethod
    def prefill_len(request: T3Request) -> int:
        return 1 + request.prompt_speech_tokens.numel() + request.text_tokens.numel() + 1

    def prefix_embeds(self, request: T3Request) -> torch.Tensor:
        """The voice part of a prefill row, ``[spkr_enc(speaker_emb) | speech_emb(prompt)]`` (1 + P, W)."""
        device, dtype = self.device, self.speech_emb.weight.dtype
        speaker = self.cond_enc.spkr_enc(request.speaker_emb.to(device, dtype)[None])  # (1, W)
        return torch.cat((speaker, self.speech_emb(request.prompt_speech_tokens.to(device))))

    def text_embeds(self, request: T3Request) -> torch.Tensor:
        """The rest of a prefill row, ``[text_emb(text) | speech_emb(START)]`` (Lt + 1, W)."""
        start = torch.tensor([START_SPEECH_TOKEN], device=self.device)
        return torch.cat((self.text_emb(request.text_tokens.to(self.device)), self.speech_emb(start)))

    def last_logits(
        self, embeds: torch.Tensor, positions: torch.Tensor, context: SlotContext
    ) -> torch.Tensor:
        """Run embeds (B, T, W) at positions (B, T) through the backbone, extending the context's
        cache; returns the logits after each row's last position (B, V) float32."""
        hidden = self.tfmr(embeds, positions, context)
        return self.speech_head(hidden[:, -1].float())

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, context: SlotContext
    ) -> torch.Tensor:
        """Feed one token per row: tokens, positions (B,) int64. Returns logits (B, V) float32."""
        return self.last_logits(self.speech_emb(tokens)[:, None], positions[:, None], context)
