"""Builds the upstream reference modules for a checkpoint directory (runs in ``.venv-ref`` only)."""

from __future__ import annotations

from pathlib import Path

import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.voice_encoder import VoiceEncoder
from safetensors.torch import load_file


def turbo_t3_config() -> T3Config:
    """The T3Config overrides upstream's ChatterboxTurboTTS.from_local applies."""
    hp = T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = "GPT2_medium"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp


def load_t3(ckpt_dir: str | Path) -> T3:
    t3 = T3(turbo_t3_config())
    t3.load_state_dict(load_file(Path(ckpt_dir) / "t3_turbo_v1.safetensors"))
    del t3.tfmr.wte
    return t3.eval()


def load_s3gen(ckpt_dir: str | Path) -> S3Gen:
    s3gen = S3Gen(meanflow=True)
    s3gen.load_state_dict(load_file(Path(ckpt_dir) / "s3gen_meanflow.safetensors"), strict=True)
    return s3gen.eval()


def load_voice_encoder(ckpt_dir: str | Path) -> VoiceEncoder:
    ve = VoiceEncoder()
    ve.load_state_dict(load_file(Path(ckpt_dir) / "ve.safetensors"))
    return ve.eval()


@torch.no_grad()
def module_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """Freshly constructed (randomly initialised) Turbo modules, keyed by checkpoint file."""
    return {
        "t3_turbo_v1.safetensors": T3(turbo_t3_config()).state_dict(),
        "s3gen_meanflow.safetensors": S3Gen(meanflow=True).state_dict(),
        "ve.safetensors": VoiceEncoder().state_dict(),
    }
