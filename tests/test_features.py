"""Audio front ends of voice conditioning: lengths, layouts and where a pure tone lands."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from chatterbox.voice import features


def tone(freq: float, seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[spectrum.argmax()])


@pytest.mark.parametrize("n", [24_000, 24_001, 24_002])
def test_resamplers_keep_the_pitch_and_give_ceil_two_thirds(n):
    wav = tone(440.0, 1.0, 24_000)[:n] if n <= 24_000 else np.pad(tone(440.0, 1.0, 24_000), (0, n - 24_000))
    soxr = features.soxr_resample_24k_to_16k(wav)
    sinc = features.sinc_resample_24k_to_16k(torch.from_numpy(wav)).numpy()
    assert soxr.dtype == np.float32 and sinc.dtype == np.float32
    assert len(soxr) == len(sinc) == -(-2 * n // 3)
    assert abs(peak_hz(soxr, 16_000) - 440.0) < 2 and abs(peak_hz(sinc, 16_000) - 440.0) < 2
    # Two different filters: close in the passband, not identical.
    assert 0 < np.abs(soxr[100:-100] - sinc[100:-100]).max() < 1e-2


def test_tokenizer_log_mel_layout_and_normalisation():
    wav = torch.from_numpy(tone(1000.0, 1.234, 16_000))
    filters = torch.from_numpy(librosa.filters.mel(sr=16_000, n_fft=400, n_mels=128, fmin=0.0, fmax=8000.0))
    mel = features.tokenizer_log_mel(wav, filters, torch.hann_window(400))
    assert mel.shape == (128, wav.shape[0] // 160)
    # log10 with an 80 dB floor below the peak, then (x + 4) / 4: a range of exactly 2.
    assert mel.max() - mel.min() == pytest.approx(2.0, abs=1e-6)
    centres = librosa.mel_frequencies(n_mels=130, fmin=0.0, fmax=8000.0)[1:-1]
    assert abs(centres[int(mel[:, 10:-10].mean(dim=1).argmax())] - 1000.0) < 60


@pytest.mark.parametrize("n", [48_000, 48_479, 48_480 + 1])
def test_s3gen_mel_frames_and_tone_bin(n):
    wav = torch.from_numpy(np.resize(tone(1000.0, 2.1, 24_000), n))
    mel = features.s3gen_mel(wav)
    assert mel.shape == (n // 480, 80)
    centres = librosa.mel_frequencies(n_mels=82, fmin=0.0, fmax=8000.0)[1:-1]
    assert abs(centres[int(mel.mean(dim=0).argmax())] - 1000.0) < 120
    assert mel.min() >= np.log(1e-5) - 1e-6  # the log floor


def test_kaldi_fbank_is_mean_normalised():
    wav = torch.from_numpy(tone(300.0, 1.0, 16_000))
    fbank = features.kaldi_fbank_cmn(wav)
    assert fbank.shape == (1 + (16_000 - 400) // 160, 80)
    torch.testing.assert_close(fbank.mean(dim=0), torch.zeros(80), atol=1e-4, rtol=0)


def test_voice_encoder_mel_is_linear_power():
    wav = tone(500.0, 1.0, 16_000)
    mel = features.voice_encoder_mel(wav, 40)
    assert mel.shape == (1 + 16_000 // 160, 40) and mel.dtype == np.float32
    louder = features.voice_encoder_mel(2 * wav, 40)
    np.testing.assert_allclose(louder, 4 * mel, rtol=1e-5, atol=1e-6)  # power, no log


def test_resampler_and_fbank_batch_rows_equal_each_row_alone():
    rows = torch.stack([torch.from_numpy(tone(f, 1.0, 24_000)) for f in (220.0, 440.0, 880.0)])
    batched = features.sinc_resample_24k_to_16k(rows)
    assert batched.shape == (3, 16_000)
    for row, out in zip(rows, batched, strict=True):
        torch.testing.assert_close(out, features.sinc_resample_24k_to_16k(row), atol=1e-6, rtol=0)
    fbank = features.kaldi_fbank(batched)
    assert fbank.shape == (3, 1 + (16_000 - 400) // 160, 80)
    for row, out in zip(batched, fbank, strict=True):
        torch.testing.assert_close(out, features.kaldi_fbank(row), atol=1e-5, rtol=0)


def test_resampler_and_fbank_follow_the_input_dtype():
    wav = torch.from_numpy(tone(440.0, 0.5, 24_000)).double()
    resampled = features.sinc_resample_24k_to_16k(wav)
    assert resampled.dtype == torch.float64
    fbank = features.kaldi_fbank(resampled)
    assert fbank.dtype == torch.float64
    torch.testing.assert_close(fbank.float(), features.kaldi_fbank(resampled.float()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmax"),
    [
        (features.S3GEN_SR, features.S3GEN_N_FFT, features.S3GEN_MEL_BINS, features.S3GEN_FMAX),  # S3Gen
        (16_000, 400, 128, 8000.0),  # the speech tokenizer's
    ],
)
def test_mel_filters_are_librosas_bank_bit_for_bit(sr, n_fft, n_mels, fmax):
    ours = features.mel_filters(sr, n_fft, n_mels, fmax)
    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=fmax)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours, theirs)
