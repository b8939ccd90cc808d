"""T3: text tokens + voice conditioning -> speech tokens, batched (turbo-spec 3).

Each request's prefill row is ``[spkr_enc(speaker_emb), speech_emb(prompt), text_emb(text),
speech_emb(START)]``. Rows are left-padded into one prefill; a key-validity mask hides the padding
and per-row positions start at 0 on each row's first real token, so every row computes what it
would alone. Decoding then advances all rows one token per step through a preallocated KV cache;
each row samples with its own settings, repetition history and seed, and stops on its own.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chatterbox.constants import (
    SPEECH_VOCAB_SIZE,
    START_SPEECH_TOKEN,
    STOP_SPEECH_TOKEN,
    T3_PROMPT_TOKENS,
    T3_SPEECH_VOCAB_SIZE,
)
from chatterbox.sampling import SamplingParams
from chatterbox.t3.gpt2 import GPT2, AttentionContext, CacheContext, GPT2Config, KVCache, linear_layout
from chatterbox.t3.sampler import process_logits, sample, seed_keys
from chatterbox.weights import CheckpointError, load_strict, read_safetensors, require_keys, subdict

SYNC_EVERY = 8  # decode steps between the one host sync that asks "has any row finished?"
COMPACT_FRACTION = 0.25  # pack the batch once this share of live rows has finished


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


@dataclass
class _DecodeState:
    """Everything one decode loop carries per live row; all tensors on the model's device."""

    rows: torch.Tensor  # (B,) int64 index of each live row's request
    tokens: torch.Tensor  # (B,) int64 last sampled token (the next decode input)
    positions: torch.Tensor  # (B,) int64 position id of the next decode input
    key_valid: torch.Tensor  # (B, max_len) bool, False on left padding
    seen: torch.Tensor  # (B, V) bool, ids the repetition penalty applies to
    counts: torch.Tensor  # (B,) int64 tokens sampled so far (also the noise step)
    limits: torch.Tensor  # (B,) int64 most tokens the row may sample
    finished: torch.Tensor  # (B,) bool
    keys: torch.Tensor  # (B,) int64 seed keys
    temperature: torch.Tensor  # (B,) float32
    top_k: torch.Tensor  # (B,) int64
    top_p: torch.Tensor  # (B,) float32
    repetition_penalty: torch.Tensor  # (B,) float32
    candidates: int  # largest top_k of the batch: scores sorted per row

    def select(self, keep: torch.Tensor) -> _DecodeState:
        rows = {name: value[keep] for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return _DecodeState(**rows, candidates=self.candidates)


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

    # ----------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------

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

    # ----------------------------------------------------------------------------------------
    # Validation and prefill
    # ----------------------------------------------------------------------------------------

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

    def _prefill(
        self, requests: list[T3Request], steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache, int]:
        """One left-padded forward over every request's prefill row.

        Returns the logits after each row's START token (B, V) float32, the position of each
        row's next input (B,), the key-validity mask (B, max_len), the filled cache, and the
        prefill length (the first free cache slot). The cache holds ``steps`` more slots.
        """
        device, dtype = self.device, self.speech_emb.weight.dtype
        rows = [torch.cat((self.prefix_embeds(r), self.text_embeds(r))) for r in requests]
        lengths = torch.tensor([len(row) for row in rows], device=device)
        prefill_len = int(lengths.max())
        embeds = torch.stack([F.pad(row, (0, 0, prefill_len - len(row), 0)) for row in rows])  # (B, L, W)
        pad = prefill_len - lengths  # (B,) left padding per row
        max_len = prefill_len + steps
        key_valid = torch.arange(max_len, device=device)[None, :] >= pad[:, None]  # (B, max_len)
        slots = torch.arange(prefill_len, device=device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, L)
        cache = KVCache(self.config.gpt2, len(requests), max_len, dtype, device)
        context = AttentionContext.causal(cache, slots, key_valid, prefill_len)
        return self.last_logits(embeds, positions, context), lengths, key_valid, cache, prefill_len

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
        self, embeds: torch.Tensor, positions: torch.Tensor, context: CacheContext
    ) -> torch.Tensor:
        """Run embeds (B, T, W) at positions (B, T) through the backbone, extending the context's
        cache; returns the logits after each row's last position (B, V) float32."""
        hidden = self.tfmr(embeds, positions, context)
        return self.speech_head(hidden[:, -1].float())

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, context: CacheContext
    ) -> torch.Tensor:
        """Feed one token per row: tokens, positions (B,) int64. Returns logits (B, V) float32."""
        return self.last_logits(self.speech_emb(tokens)[:, None], positions[:, None], context)

    # ----------------------------------------------------------------------------------------
    # Public inference
    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[T3Request], ignore_stop_token: bool = False) -> list[torch.Tensor]:
        """Sample speech tokens for every request in one batch.

        Returns one (N_i,) int64 CPU tensor per request: the tokens it sampled before it stopped,
        with ids >= 6561 dropped. As in the reference's ``inference_turbo``, only a stop token
        drawn after the first token ends a row: a first draw of STOP is fed back like any other
        token (and joins the repetition history), then dropped from the result. ``ignore_stop_token``
        runs every row to its token limit.
        """
        if not requests:
            return []
        for i, r in enumerate(requests):
            self._check_request(i, r, r.sampling.max_new_tokens)
        device = self.device
        params = [r.sampling for r in requests]
        limits = [p.max_new_tokens + 1 for p in params]
        max_tokens = max(limits)
        seeds = [secrets.randbits(63) if p.seed is None else p.seed for p in params]

        logits, positions, key_valid, cache, prefill_len = self._prefill(requests, max_tokens - 1)
        B, V = logits.shape
        state = _DecodeState(
            rows=torch.arange(B, device=device),
            tokens=torch.empty(B, dtype=torch.long, device=device),
            positions=positions,
            key_valid=key_valid,
            seen=F.one_hot(torch.full((B,), START_SPEECH_TOKEN, device=device), V).bool(),
            counts=torch.zeros(B, dtype=torch.long, device=device),
            limits=torch.tensor(limits, device=device),
            finished=torch.zeros(B, dtype=torch.bool, device=device),
            keys=seed_keys(torch.tensor(seeds, device=device)),
            temperature=torch.tensor([p.temperature for p in params], device=device),
            top_k=torch.tensor([p.top_k for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            repetition_penalty=torch.tensor([p.repetition_penalty for p in params], device=device),
            candidates=max(p.top_k for p in params),
        )
        # One spare column: finished rows keep writing their (ignored) draws one past their end.
        out = torch.full((B, max_tokens + 1), STOP_SPEECH_TOKEN, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)

        # The reference never checks its first draw for STOP, so a first STOP does not end a row.
        state = self._sample_into(state, logits, out, ignore_stop_token=True)
        # The first draw saw only START in its history; from here on the history is the row's own.
        state.seen = F.one_hot(state.tokens, V).bool()
        slot = torch.tensor([prefill_len], device=device)  # cache slot of the next decode input
        for step in range(1, max_tokens):
            kv_len = prefill_len + step
            context = AttentionContext.causal(cache, slot, state.key_valid, kv_len)
            logits = self.decode_step(state.tokens, state.positions, context)
            state.positions = self._advance(state.positions)
            slot += 1
            state = self._sample_into(state, logits, out, ignore_stop_token)
            if step % SYNC_EVERY == 0:
                finished = state.finished.tolist()  # the only device->host sync of the loop
                if all(finished):
                    break
                if sum(finished) >= max(1, COMPACT_FRACTION * len(finished)):
                    lengths[state.rows] = state.counts
                    keep = [i for i, done in enumerate(finished) if not done]
                    cache.keep_rows(keep, kv_len)
                    state = state.select(torch.tensor(keep, device=device))
        lengths[state.rows] = state.counts

        results = []
        for row, n in zip(out.cpu(), lengths.tolist(), strict=True):
            tokens = row[:n]
            results.append(tokens[tokens < SPEECH_VOCAB_SIZE])
        return results

    def _advance(self, positions: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Positions ``steps`` further on, kept inside the position table.

        A batch runs as long as its longest row: rows past their own run (finished, or out of
        forced tokens) keep stepping, their outputs unread, until compaction drops them. Their
        position ids still index the table, so they stop at its last entry; a row within its own
        run never reaches it (``_check_request`` budgets each row's run against the table).
        """
        return (positions + steps).clamp(max=self.config.gpt2.positions - 1)

    @staticmethod
    def _sample_into(
        state: _DecodeState, logits: torch.Tensor, out: torch.Tensor, ignore_stop_token: bool
    ) -> _DecodeState:
        """Process and sample one token per live row, record it, and update the row flags."""
        scores = process_logits(
            logits,
            state.seen,
            state.temperature,
            state.top_k,
            state.top_p,
            state.repetition_penalty,
            state.candidates,
        )
        tokens = sample(scores, state.keys, state.counts)
        out[state.rows, state.counts] = tokens  # finished rows write one past their end (ignored)
        live = ~state.finished
        state.counts = state.counts + live
        state.seen.scatter_(1, tokens[:, None], True)
        stopped = state.counts >= state.limits
        if not ignore_stop_token:
            stopped |= tokens == STOP_SPEECH_TOKEN
        state.finished = state.finished | stopped
        state.tokens = tokens
        return state
