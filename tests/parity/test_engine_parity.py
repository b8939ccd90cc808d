"""The whole pipeline: upstream's ChatterboxTurboTTS.generate and our TurboTTS give the same audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chatterbox.constants import STOP_SPEECH_TOKEN
from chatterbox.sampling import SamplingParams
from chatterbox.t3 import T3Request
from chatterbox.tts import TTSRequest, TurboTTS, derive_seed
from chatterbox.weights import read_safetensors
from reference.oracle import run_reference
from tests.audio_samples import encode, speechlike
from tests.model_probes import teacher_forced_logits
from tests.t3_weight_edits import stop_only_after_start

pytestmark = pytest.mark.parity

TEXT = "Oh, that's hilarious! [chuckle] Um anyway, we do have a new model in store."
MAX_NEW_TOKENS = 100
SEED = 1234
# Greedy T3 (top_k=1) makes the tokens deterministic on both sides; S3Gen's noise follows the seed.
SAMPLING = {"temperature": 0.8, "top_k": 1, "top_p": 0.95, "repetition_penalty": 1.2}


def _compare_with_upstream(ckpt_dir: Path, tmp_path: Path) -> tuple[TurboTTS, TTSRequest, torch.Tensor]:
    """Asserts equal speech tokens and audio before watermarking; returns our engine, request, tokens."""
    reference_clip = tmp_path / "voice.wav"
    reference_clip.write_bytes(encode(speechlike(10.0, 44100, seed=5), 44100, subtype="FLOAT"))
    ref, _ = run_reference(
        "pipeline.generate",
        ckpt_dir=str(ckpt_dir),
        wav_path=str(reference_clip),
        text=TEXT,
        sampling=SAMPLING,
        max_new_tokens=MAX_NEW_TOKENS,
        s3gen_seed=derive_seed(SEED, "s3gen"),
    )

    tts = TurboTTS.from_pretrained(local_dir=ckpt_dir, device="cpu", dtype=torch.float32)
    voice = tts.prepare_voice(reference_clip.read_bytes())
    request = TTSRequest(
        TEXT, voice=voice, sampling=SamplingParams(seed=SEED, max_new_tokens=MAX_NEW_TOKENS, **SAMPLING)
    )
    tokens = tts.speech_tokens([request])[0]
    ours = tts.generate([request], watermark=False)[0]

    ref_tokens = ref["speech_tokens"][:-3]  # upstream appends the 3 silence tokens before S3Gen
    assert torch.equal(tokens, ref_tokens)
    ref_wav = ref["wav"].numpy()
    assert ours.shape == ref_wav.shape
    peak = np.abs(ref_wav).max()
    assert peak > 0
    assert np.abs(ours - ref_wav).max() <= 1e-3 * peak
    return tts, request, tokens


def test_greedy_pipeline_matches_upstream_before_watermarking(full_checkpoint: Path, tmp_path: Path):
    _, _, tokens = _compare_with_upstream(full_checkpoint, tmp_path)
    assert tokens.numel() > MAX_NEW_TOKENS // 2


@pytest.fixture(scope="module")
def stop_first_checkpoint(full_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full fixture with T3 edited so that STOP is the greedy first token, and only the first."""
    ckpt_dir = tmp_path_factory.mktemp("stop-first-checkpoint")
    for file in full_checkpoint.iterdir():
        if file.name != "t3_turbo_v1.safetensors":
            (ckpt_dir / file.name).symlink_to(file)
    tensors = read_safetensors(full_checkpoint / "t3_turbo_v1.safetensors")
    stop_only_after_start(tensors)
    save_file(tensors, ckpt_dir / "t3_turbo_v1.safetensors")
    return ckpt_dir


def test_a_first_stop_token_is_decoded_past_as_upstream_does(stop_first_checkpoint: Path, tmp_path: Path):
    """Upstream's inference_turbo never checks its first draw: it feeds STOP back and goes on;
    generate() then drops the ids >= 6561 and vocodes the rest."""
    tts, request, tokens = _compare_with_upstream(stop_first_checkpoint, tmp_path)
    assert tokens.numel() == MAX_NEW_TOKENS  # STOP, then MAX_NEW_TOKENS draws with no later STOP
    conditionals = request.voice.conditionals
    first = T3Request(
        torch.tensor(tts.text_tokens(TEXT)), conditionals.speaker_emb, conditionals.t3_prompt_tokens
    )
    first_logits = teacher_forced_logits(tts.t3, [first], [torch.zeros(0, dtype=torch.long)])[0][0]
    assert first_logits.argmax() == STOP_SPEECH_TOKEN
