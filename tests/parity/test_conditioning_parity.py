"""Voice conditioning against upstream ``prepare_conditionals`` (full-size random checkpoint, fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch

from chatterbox.constants import S3GEN_SR
from chatterbox.voice.conditioning import VoiceConditioner
from reference.oracle import run_reference
from tests.model_probes import conditioner_from_files

pytestmark = pytest.mark.parity

DURATIONS = (6.0, 10.0, 20.0)
FILE_RATES = (16_000, 24_000, 44_100)
CASES = [f"{int(s)}s_{sr}" for s in DURATIONS for sr in FILE_RATES]
TOKENIZER_BATCH = ["6s_44100", "10s_44100", "20s_44100"]  # different lengths, padded together
TARGET_LUFS = -27.0


def speech_like(seconds: float, sr: int, seed: int) -> np.ndarray:
    """A deterministic voiced/unvoiced test signal: a gliding harmonic tone with formant-like
    weighting, syllable envelopes with pauses, and noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + (25 * seed) % 60 + 30 * np.sin(2 * np.pi * 0.35 * t) + 12 * np.sin(2 * np.pi * 2.1 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros_like(t)
    for k in range(1, 30):
        freq = k * f0
        weight = np.exp(-(((freq - 650) / 350) ** 2)) + 0.6 * np.exp(-(((freq - 1700) / 600) ** 2)) + 0.05 / k
        voiced += np.where(freq < sr / 2 - 500, weight, 0.0) * np.sin(k * phase)
    syllables = np.clip(np.sin(2 * np.pi * 2.3 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    pauses = (np.sin(2 * np.pi * 0.23 * t + rng.uniform(0, 6)) > -0.8).astype(float)
    noise = np.convolve(rng.standard_normal(t.shape[0]), np.ones(4) / 4, mode="same")
    bursts = (np.sin(2 * np.pi * 0.9 * t + rng.uniform(0, 6)) > 0.85).astype(float)
    signal = voiced * syllables * pauses + 0.8 * noise * bursts + 0.003 * rng.standard_normal(t.shape[0])
    return (0.4 * signal / np.abs(signal).max()).astype(np.float32)


def norm_loudness(wav: np.ndarray) -> np.ndarray:
    """What the serving layer does before conditioning (upstream norm_loudness, -27 LUFS).

    The gain is applied as a float32 scalar: upstream runs on NumPy 1.x, where a float32 array
    times a float64 scalar stays float32 arithmetic; under NumPy 2 the same expression would
    compute (and return) float64, which differs in the last bit after rounding.
    """
    loudness = pyloudnorm.Meter(S3GEN_SR).integrated_loudness(wav)
    return wav * np.float32(10.0 ** ((TARGET_LUFS - loudness) / 20.0))


@pytest.fixture(scope="module")
def wav_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("references")
    paths = {}
    for i, case in enumerate(CASES):
        seconds, sr = case.split("s_")
        paths[case] = out / f"{case}.wav"
        sf.write(paths[case], speech_like(float(seconds), int(sr), seed=i), int(sr), subtype="PCM_16")
    return paths


@pytest.fixture(scope="module")
def reference(full_checkpoint: Path, wav_paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    tensors, _ = run_reference(
        "voice.prepare_conditionals",
        ckpt_dir=str(full_checkpoint),
        wav_paths={case: str(path) for case, path in wav_paths.items()},
        tokenizer_batch=TOKENIZER_BATCH,
        ve_batch=CASES,
    )
    return tensors


@pytest.fixture(scope="module")
def conditioner(full_checkpoint: Path) -> VoiceConditioner:
    return conditioner_from_files(
        full_checkpoint / "s3gen_meanflow.safetensors", full_checkpoint / "ve.safetensors"
    )


@pytest.fixture(scope="module")
def ours(conditioner: VoiceConditioner, wav_paths: dict[str, Path]) -> dict[str, object]:
    wavs = {case: norm_loudness(librosa.load(path, sr=S3GEN_SR)[0]) for case, path in wav_paths.items()}
    return dict(zip(CASES, conditioner.condition([wavs[case] for case in CASES]), strict=True)) | {
        "wavs": wavs
    }


def test_our_loudness_normalised_input_is_upstreams(ours, reference):
    """Same samples up to one float32 step of the gain.

    pyloudnorm sums float32 squares, which NumPy 2 (ours) and NumPy 1.26 (upstream's venv) do in a
    different order: the integrated loudness differs by ~1e-7 dB, and for an unlucky file (one of
    the nine here) the gain rounds to the neighbouring float32.
    """
    identical = 0
    for case in CASES:
        wav, ref = ours["wavs"][case], reference[f"{case}.wav_24k"].numpy()
        assert wav.dtype == np.float32
        np.testing.assert_allclose(wav, ref, rtol=3e-7, atol=0, err_msg=case)
        identical += np.array_equal(wav, ref)
    assert identical >= len(CASES) - 2


@pytest.mark.parametrize("case", CASES)
def test_conditionals_match_prepare_conditionals(case, ours, reference):
    cond = ours[case]
    ref = {k.removeprefix(f"{case}."): v for k, v in reference.items() if k.startswith(f"{case}.")}
    assert torch.equal(cond.t3_prompt_tokens, ref["t3_prompt_tokens"])
    assert torch.equal(cond.prompt_tokens, ref["prompt_tokens"])
    assert int(ref["prompt_token_len"][0]) == cond.prompt_tokens.shape[0]
    assert cond.prompt_feat.shape == ref["prompt_feat"].shape
    torch.testing.assert_close(cond.prompt_feat, ref["prompt_feat"], atol=1e-4, rtol=0)
    # The random-weight voice encoder barely depends on its input (embeddings of different cases
    # differ by 1e-4 to 5e-4), so its check is tighter than the 1e-4 asked for to stay meaningful.
    torch.testing.assert_close(cond.speaker_emb, ref["speaker_emb"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.embedding, ref["embedding"], atol=1e-4, rtol=0)


def test_expected_prompt_lengths(ours):
    for case in CASES:
        seconds = float(case.split("s_")[0])
        cond = ours[case]
        assert cond.t3_prompt_tokens.shape[0] == min(375, int(seconds * 25)), case
        assert cond.prompt_feat.shape[0] == min(500, int(seconds * 50)), case
        assert cond.prompt_tokens.shape[0] == cond.prompt_feat.shape[0] // 2, case


def test_batched_speech_tokenizer_matches_upstream_batch(conditioner, reference):
    refs = [reference[f"{case}.ref_16k"] for case in TOKENIZER_BATCH]
    tokens, lens = conditioner.speech_tokenizer.tokenize(refs)
    for i, case in enumerate(TOKENIZER_BATCH):
        assert torch.equal(tokens[i, : lens[i]], reference[f"{case}.batch_tokens"]), case


def test_batched_voice_encoder_matches_upstream_batch(ours, reference):
    for case in CASES:
        torch.testing.assert_close(
            ours[case].speaker_emb, reference[f"{case}.batch_speaker_emb"], atol=1e-6, rtol=0
        )
