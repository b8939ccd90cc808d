"""Test-only views into the models: intermediate outputs the product never needs.

They drive the models' own prefill, decode and encoder code, so what they observe is what
generation computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from chatterbox.constants import S3GEN_MEL_FRAMES_PER_TOKEN
from chatterbox.engine.kv_cache import SlotCache, SlotContext
from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.t3 import T3, T3Request
from chatterbox.voice.conditioning import VoiceConditioner
from chatterbox.weights import read_safetensors


@torch.inference_mode()
def teacher_forced_logits(
    model: T3, requests: list[T3Request], speech_tokens: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Raw speech logits along given speech tokens, through T3's own prefill and decode steps.

    speech_tokens[i] (N_i,) int64 < 6563 are fed after request i's START. Returns one
    (N_i + 1, V) float32 CPU tensor per request: row 0 predicts the first token, row j the
    token after speech_tokens[i][j-1]. Each request's whole prefill row is one forward in a cache
    row of its own; the decode steps run all requests together. Sampling settings are ignored.
    """
    if len(speech_tokens) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(speech_tokens)} speech token sequences")
    for i, (r, t) in enumerate(zip(requests, speech_tokens, strict=True)):
        model._check_request(i, r, t.numel())
        if t.dim() != 1 or (t.numel() and (t.min() < 0 or t.max() >= model.config.speech_vocab)):
            raise ValueError(f"speech_tokens[{i}] must be 1-D with ids in [0, {model.config.speech_vocab})")
    if not requests:
        return []
    device, dtype = model.device, model.speech_emb.weight.dtype
    steps = max(t.numel() for t in speech_tokens)
    prefill_lens = [T3.prefill_len(r) for r in requests]
    positions = max(n + t.numel() for n, t in zip(prefill_lens, speech_tokens, strict=True))
    cache = SlotCache(model.config.gpt2, len(requests), positions, dtype, device)
    first = []
    for row, (request, n) in enumerate(zip(requests, prefill_lens, strict=True)):
        embeds = torch.cat((model.prefix_embeds(request), model.text_embeds(request)))[None]  # (1, n, W)
        context = SlotContext.prefill(cache, row, 0, n, dtype, device)
        first.append(model.last_logits(embeds, torch.arange(n, device=device)[None], context))
    all_logits = [torch.cat(first)]  # (B, V)
    forced = torch.stack([F.pad(t.to(device), (0, steps - t.numel())) for t in speech_tokens])  # (B, steps)
    lengths = torch.tensor(prefill_lens, device=device)
    for step in range(steps):
        # A row past its own tokens keeps stepping, unread, at its cache row's last position.
        at = (lengths + step).clamp(max=positions - 1)  # (B,)
        context = SlotContext.decode(cache, at, int(at.max()) + 1, dtype)
        all_logits.append(model.decode_step(forced[:, step], at, context))
    stacked = torch.stack(all_logits, dim=1).cpu()  # (B, steps + 1, V)
    return [stacked[i, : t.numel() + 1] for i, t in enumerate(speech_tokens)]


@torch.inference_mode()
def s3gen_encoder_outputs(model: S3Gen, requests: list[S3GenRequest]) -> list[torch.Tensor]:
    """The flow encoder's output per request, (2 * n_tokens, width) float32 on CPU."""
    model._check(requests, None)
    tokens, lengths = model._tokens(requests)
    hidden = model.flow.encode(tokens, lengths)
    return [
        h[: S3GEN_MEL_FRAMES_PER_TOKEN * r.n_tokens].float().cpu()
        for h, r in zip(hidden, requests, strict=True)
    ]


def conditioner_from_files(s3gen_path: Path, ve_path: Path) -> VoiceConditioner:
    """The voice conditioner of a checkpoint's two files, on CPU."""
    return VoiceConditioner.from_state_dicts(read_safetensors(s3gen_path), read_safetensors(ve_path))
