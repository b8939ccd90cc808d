"""A voice: the conditionals of T3 and S3Gen one reference clip reduces to, and their file format."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from chatterbox.errors import TTSInputError

VOICE_FORMAT = "chatterbox-serve-voice/1"
_CONDITIONAL_FIELDS = ("speaker_emb", "t3_prompt_tokens", "prompt_tokens", "prompt_feat", "embedding")


@dataclass
class VoiceConditionals:
    """Everything a voice contributes to synthesis; computed once per voice and cached."""

    speaker_emb: Tensor  # (S,) float32 voice-encoder embedding (T3 speaker input; S = 256)
    t3_prompt_tokens: Tensor  # (P_t3,) int64, P_t3 <= 375: first 15 s of the reference
    prompt_tokens: Tensor  # (P,) int64 S3Gen prompt tokens: first 10 s
    prompt_feat: Tensor  # (T_mel, 80) float32 S3Gen mel of the first 10 s at 24 kHz
    embedding: Tensor  # (192,) float32 CAMPPlus x-vector


@dataclass
class Voice:
    """The conditionals of one reference voice, as T3 and S3Gen consume them."""

    id: str
    conditionals: VoiceConditionals

    def to(self, device: torch.device | str) -> Voice:
        moved = {name: getattr(self.conditionals, name).to(device) for name in _CONDITIONAL_FIELDS}
        return Voice(self.id, VoiceConditionals(**moved))

    def to_bytes(self) -> bytes:
        """A self-describing safetensors blob (no pickle)."""
        tensors = {
            name: getattr(self.conditionals, name).detach().cpu().contiguous() for name in _CONDITIONAL_FIELDS
        }
        return save_safetensors(tensors, metadata={"format": VOICE_FORMAT, "id": self.id})

    @classmethod
    def from_bytes(cls, data: bytes) -> Voice:
        metadata = _safetensors_metadata(data)
        if metadata.get("format") != VOICE_FORMAT or "id" not in metadata:
            raise TTSInputError(f"not a serialised voice (expected format {VOICE_FORMAT})", "voice")
        tensors = load_safetensors(data)
        if set(tensors) != set(_CONDITIONAL_FIELDS):
            raise TTSInputError(f"serialised voice must hold exactly {sorted(_CONDITIONAL_FIELDS)}", "voice")
        return cls(metadata["id"], VoiceConditionals(**tensors))

    @classmethod
    def from_builtin(cls, conds_path: str | Path) -> Voice:
        """The checkpoint's built-in voice (``conds.pt``, upstream's torch format, loaded weights-only)."""
        conds = torch.load(conds_path, map_location="cpu", weights_only=True)
        t3, gen = conds["t3"], conds["gen"]
        conditionals = VoiceConditionals(
            speaker_emb=t3["speaker_emb"].reshape(-1).float(),
            t3_prompt_tokens=t3["cond_prompt_speech_tokens"].reshape(-1).long(),
            prompt_tokens=gen["prompt_token"].reshape(-1).long(),
            prompt_feat=gen["prompt_feat"].reshape(-1, gen["prompt_feat"].shape[-1]).float(),
            embedding=gen["embedding"].reshape(-1).float(),
        )
        digest = hashlib.sha256(Path(conds_path).read_bytes()).hexdigest()
        return cls(f"builtin-{digest[:16]}", conditionals)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header: 8-byte length, then JSON)."""
    if len(data) < 8:
        raise TTSInputError("serialised voice is truncated", "voice")
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TTSInputError("serialised voice has a corrupt header", "voice") from exc
    return header.get("__metadata__", {}) if isinstance(header, dict) else {}
