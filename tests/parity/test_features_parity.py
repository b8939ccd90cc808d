"""Our plain-torch resampler and Kaldi filter bank against torchaudio's (in the oracle venv).

The error bound is 1e-5: absolute on resampled samples (peak 0.5) and on log filter-bank energies.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from chatterbox.voice import features
from reference.oracle import run_reference
from tests.audio_samples import speechlike

pytestmark = pytest.mark.parity

# Lengths in samples at the input rate: whole seconds, lengths that are not a multiple of the hop
# (160 at 16 kHz) or of the resampling ratio (3 at 24 kHz), the shortest frame, and a 5.01 s clip.
RESAMPLE_LENGTHS = (3, 24_000, 24_001, 24_002, 77_777, round(5.01 * 24_000), 240_000)
FBANK_LENGTHS = (400, 401, 559, 16_000, 16_159, 33_333, round(5.01 * 16_000), 160_000)
TOLERANCE = 1e-5


def _signals(lengths: tuple[int, ...], sample_rate: int) -> dict[str, torch.Tensor]:
    """Pieces of one 12 s speech-like signal, each starting at a different offset."""
    source = torch.from_numpy(speechlike(12.0, sample_rate, seed=0))
    return {f"wav_{n}": source[i * 7_919 : i * 7_919 + n].clone() for i, n in enumerate(lengths)}


def _assert_matches_reference(task: str, inputs: dict[str, torch.Tensor], ours: Callable) -> None:
    """``ours`` on every input equals the oracle's ``task`` within TOLERANCE (shape and dtype too)."""
    expected, _ = run_reference(task, inputs)
    errors = {}
    for key, wav in inputs.items():
        out = ours(wav)
        assert out.shape == expected[key].shape and out.dtype == torch.float32
        errors[key] = float((out - expected[key]).abs().max())
    print(f"{task}: max |error| per input:", errors)
    assert all(error < TOLERANCE for error in errors.values()), errors  # NaN fails too


def test_sinc_resampler_equals_torchaudio():
    inputs = _signals(RESAMPLE_LENGTHS, 24_000)
    _assert_matches_reference("features.resample", inputs, features.sinc_resample_24k_to_16k)
    # Batched rows equal each row alone.
    batch = torch.stack([inputs["wav_240000"], inputs["wav_240000"].flip(0)])
    torch.testing.assert_close(
        features.sinc_resample_24k_to_16k(batch)[1],
        features.sinc_resample_24k_to_16k(inputs["wav_240000"].flip(0)),
        atol=1e-6,
        rtol=0,
    )


def test_kaldi_fbank_equals_torchaudio():
    _assert_matches_reference("features.fbank", _signals(FBANK_LENGTHS, 16_000), features.kaldi_fbank)
