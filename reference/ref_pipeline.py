"""Reference task for the whole Turbo pipeline: upstream's own ``ChatterboxTurboTTS.generate``."""

from __future__ import annotations

import torch
from chatterbox.tts_turbo import ChatterboxTurboTTS


def generate(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Upstream ``generate`` with a reference clip, bounded length, seeded S3Gen noise, no watermark.

    Only knobs upstream itself has are used: ``max_gen_len`` of its T3 loop, the torch seed right
    before its S3Gen call (so our seeded noise can match it draw for draw), and an identity
    watermarker (parity is defined on the audio before watermarking).
    """
    tts = ChatterboxTurboTTS.from_local(params["ckpt_dir"], "cpu")
    tts.watermarker.apply_watermark = lambda wav, sample_rate: wav

    t3_inference = tts.t3.inference_turbo
    tts.t3.inference_turbo = lambda **kw: t3_inference(**kw, max_gen_len=params["max_new_tokens"])
    s3gen_inference = tts.s3gen.inference
    speech_tokens = {}

    def seeded_s3gen(**kw: object) -> object:
        speech_tokens["tokens"] = kw["speech_tokens"].clone()
        torch.manual_seed(params["s3gen_seed"])
        return s3gen_inference(**kw)

    tts.s3gen.inference = seeded_s3gen
    wav = tts.generate(params["text"], audio_prompt_path=params["wav_path"], **params["sampling"])
    return {"wav": wav[0], "speech_tokens": speech_tokens["tokens"]}, {}
