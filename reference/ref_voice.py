"""Reference tasks for voice conditioning (runs in ``.venv-ref`` only)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import librosa
import torch
from chatterbox.tts_turbo import ChatterboxTurboTTS
from ref_common import load_s3gen, load_voice_encoder, turbo_t3_config

S3GEN_SR = 24_000
S3_SR = 16_000


def prepare_conditionals(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Upstream ``ChatterboxTurboTTS.prepare_conditionals`` on each WAV file, plus lower-level pieces.

    params: ``ckpt_dir``; ``wav_paths`` {case: path}; ``tokenizer_batch`` [case, ...] whose whole
    16 kHz references go through ``s3gen.tokenizer`` as one batch; ``ve_batch`` [case, ...] whose
    16 kHz references go through ``ve.embeds_from_wavs`` as one batch.

    ``from_local`` would also build the 1.9 GB T3 (6.7 GB peak memory) of which
    ``prepare_conditionals`` reads only ``t3.hp.speech_cond_prompt_len``; the object is built from
    upstream's own S3Gen, VoiceEncoder and Turbo T3Config instead.
    """
    ckpt = params["ckpt_dir"]
    tts = ChatterboxTurboTTS(
        t3=SimpleNamespace(hp=turbo_t3_config()),
        s3gen=load_s3gen(ckpt),
        ve=load_voice_encoder(ckpt),
        tokenizer=None,
        device="cpu",
    )
    out: dict[str, torch.Tensor] = {}
    refs_16k = {}
    seconds = {}
    for case, path in params["wav_paths"].items():
        start = time.perf_counter()
        tts.prepare_conditionals(path, norm_loudness=True)
        seconds[case] = time.perf_counter() - start
        t3, gen = tts.conds.t3, tts.conds.gen
        out[f"{case}.speaker_emb"] = t3.speaker_emb[0]
        out[f"{case}.t3_prompt_tokens"] = t3.cond_prompt_speech_tokens[0]
        out[f"{case}.prompt_tokens"] = gen["prompt_token"][0]
        out[f"{case}.prompt_token_len"] = gen["prompt_token_len"]
        out[f"{case}.prompt_feat"] = gen["prompt_feat"][0]
        out[f"{case}.embedding"] = gen["embedding"][0]
        # The same two calls prepare_conditionals starts with: our side's input.
        wav_24k, sr = librosa.load(path, sr=S3GEN_SR)
        wav_24k = tts.norm_loudness(wav_24k, sr)
        out[f"{case}.wav_24k"] = torch.from_numpy(wav_24k)
        refs_16k[case] = librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)

    batch = params["tokenizer_batch"]
    tokens, lens = tts.s3gen.tokenizer([refs_16k[case] for case in batch])
    for i, case in enumerate(batch):
        out[f"{case}.ref_16k"] = torch.from_numpy(refs_16k[case])
        out[f"{case}.batch_tokens"] = tokens[i, : lens[i]]

    ve_batch = params["ve_batch"]
    embeds = tts.ve.embeds_from_wavs([refs_16k[case] for case in ve_batch], sample_rate=S3_SR)
    for i, case in enumerate(ve_batch):
        out[f"{case}.batch_speaker_emb"] = torch.from_numpy(embeds[i])
    return out, {"prepare_seconds": seconds}
