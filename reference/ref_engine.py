"""Reference tasks for the whole TTS pipeline (runs in ``.venv-ref`` only): timed end-to-end generation."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from chatterbox.tts_turbo import ChatterboxTurboTTS, Conditionals
from ref_common import load_s3gen, load_voice_encoder
from ref_t3 import STOP_SPEECH_TOKEN, load_t3_file
from transformers import AutoTokenizer


def _turbo_tts(ckpt_dir: str, t3_file: str, device: str) -> ChatterboxTurboTTS:
    """``ChatterboxTurboTTS`` as ``from_local`` builds it, from parts: the T3 may be Nano-size,
    which ``from_local`` cannot load. The built-in voice comes from ``conds.pt``, loaded as
    ``from_local`` loads it."""
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    if tokenizer.pad_token is None:  # as from_local: generate() tokenizes with padding=True
        tokenizer.pad_token = tokenizer.eos_token
    conds = Conditionals.load(Path(ckpt_dir) / "conds.pt", map_location="cpu").to(device)
    return ChatterboxTurboTTS(
        t3=load_t3_file(t3_file).to(device),
        s3gen=load_s3gen(ckpt_dir).to(device),
        ve=load_voice_encoder(ckpt_dir).to(device),
        tokenizer=tokenizer,
        device=device,
        conds=conds,
    )


def timed_generate(tensors: dict, params: dict) -> tuple[dict, dict]:
    """Wall time of upstream ``ChatterboxTurboTTS.generate`` per text, one at a time, built-in voice.

    params: ``ckpt_dir``, ``t3_file``, ``texts`` (one request each), ``tokens`` (speech tokens
    sampled per request: the stop logit is masked and ``inference_turbo`` runs ``tokens - 1``
    decode steps, so every request has the same length), ``device``, ``threads``. Upstream runs
    fp32 and always watermarks. One untimed warm-up request of the same size comes first.
    Returns the seconds and output samples of each request.
    """
    torch.set_num_threads(params["threads"])
    tts = _turbo_tts(params["ckpt_dir"], params["t3_file"], params["device"])
    with torch.no_grad():
        tts.t3.speech_head.bias[STOP_SPEECH_TOKEN] = float("-inf")
    # generate() passes no length; an instance attribute shadows the method with the length bound.
    tts.t3.inference_turbo = functools.partial(tts.t3.inference_turbo, max_gen_len=params["tokens"] - 1)

    texts = params["texts"]
    tts.generate(texts[0])  # warm-up
    seconds, samples = [], []
    for i, text in enumerate(texts):
        torch.manual_seed(i)
        begin = time.perf_counter()
        wav = tts.generate(text)  # a CPU tensor: the device is done
        seconds.append(time.perf_counter() - begin)
        samples.append(wav.numel())
    return {}, {"seconds": seconds, "samples": samples}
