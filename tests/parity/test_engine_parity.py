"""The whole pipeline: upstream's ChatterboxTurboTTS.generate and our TurboTTS give the same audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox.engine import TTSRequest, TurboTTS, derive_seed
from tests.audio_samples import encode, speechlike
from tests.reference.oracle import run_reference

pytestmark = pytest.mark.parity

TEXT = "Oh, that's hilarious! [chuckle] Um anyway, we do have a new model in store."
MAX_NEW_TOKENS = 100
SEED = 1234


def test_greedy_pipeline_matches_upstream_before_watermarking(full_checkpoint: Path, tmp_path: Path):
    reference_clip = tmp_path / "voice.wav"
    reference_clip.write_bytes(encode(speechlike(10.0, 44100, seed=5), 44100, subtype="FLOAT"))
    # Greedy T3 (top_k=1) makes the tokens deterministic on both sides; S3Gen's noise follows the seed.
    sampling = {"temperature": 0.8, "top_k": 1, "top_p": 0.95, "repetition_penalty": 1.2}
    ref, _ = run_reference(
        "pipeline.generate",
        ckpt_dir=str(full_checkpoint),
        wav_path=str(reference_clip),
        text=TEXT,
        sampling=sampling,
        max_new_tokens=MAX_NEW_TOKENS,
        s3gen_seed=derive_seed(SEED, "s3gen"),
    )

    tts = TurboTTS.from_pretrained(local_dir=full_checkpoint, device="cpu", dtype=torch.float32)
    voice = tts.prepare_voice(reference_clip.read_bytes())
    request = TTSRequest(TEXT, voice=voice, seed=SEED, max_new_tokens=MAX_NEW_TOKENS, **sampling)
    tokens = tts.speech_tokens([request])[0]
    ours = tts.generate([request], watermark=False)[0]

    ref_tokens = ref["speech_tokens"][:-3]  # upstream appends the 3 silence tokens before S3Gen
    assert torch.equal(tokens, ref_tokens)
    assert tokens.numel() > MAX_NEW_TOKENS // 2
    ref_wav = ref["wav"].numpy()
    assert ours.shape == ref_wav.shape
    peak = np.abs(ref_wav).max()
    assert peak > 0
    assert np.abs(ours - ref_wav).max() <= 1e-3 * peak
