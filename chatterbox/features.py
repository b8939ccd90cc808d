"""Audio front ends of voice conditioning: resamplers, spectrograms, filter banks (turbo-spec 4, 5.1, 5.2, 6).

Each function reproduces the reference's arithmetic step for step (same library calls, same
operation order), because the speech tokenizer rounds its outputs and small float differences in
a feature could move a token across a rounding boundary.
"""

from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np
import torch
import torchaudio
from torch import Tensor
from torchaudio.compliance import kaldi

from chatterbox.constants import S3_SR, S3GEN_SR

TOKENIZER_HOP = 160  # 100 log-mel frames per second at 16 kHz
S3GEN_MEL_BINS = 80
S3GEN_N_FFT = 1920
S3GEN_HOP = 480  # 50 mel frames per second at 24 kHz
S3GEN_FMAX = 8000.0
FBANK_BINS = 80
VE_N_FFT = 400
VE_HOP = 160


# ---------------------------------------------------------------------------------------------
# Resampling 24 kHz -> 16 kHz: the reference uses two different resamplers (turbo-spec 1.1)
# ---------------------------------------------------------------------------------------------


def soxr_resample_24k_to_16k(wav_24k: np.ndarray) -> np.ndarray:
    """librosa's default (soxr_hq) resampler; feeds the T3 prompt tokens and the voice encoder.

    (N,) float32 -> (ceil(2N/3),) float32.
    """
    return librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)


@lru_cache(maxsize=8)
def _sinc_resampler(device: torch.device) -> torchaudio.transforms.Resample:
    # The transform computes its kernel in float64 and caches it as float32; the functional form
    # would build a float32 kernel and give different low bits.
    return torchaudio.transforms.Resample(S3GEN_SR, S3_SR).to(device)


def sinc_resample_24k_to_16k(wav_24k: Tensor) -> Tensor:
    """torchaudio's windowed-sinc resampler; feeds S3Gen's prompt tokens and the x-vector.

    (N,) float32 -> (ceil(2N/3),) float32.
    """
    return _sinc_resampler(wav_24k.device)(wav_24k[None])[0]


# ---------------------------------------------------------------------------------------------
# Spectrograms
# ---------------------------------------------------------------------------------------------


def tokenizer_log_mel(wav_16k: Tensor, mel_filters: Tensor, window: Tensor) -> Tensor:
    """Whisper-style log-mel of the speech tokenizer, normalised per utterance (turbo-spec 4.1).

    (N,) at 16 kHz -> (n_mels, N // 160). ``mel_filters`` (n_mels, n_fft/2+1) and ``window``
    (n_fft,) are the tokenizer's checkpoint buffers.
    """
    stft = torch.stft(wav_16k[None], window.shape[0], TOKENIZER_HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # the last (centre-padded) frame is dropped
    log_mel = (mel_filters @ power).clamp(min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)  # 80 dB dynamic range below the peak
    return ((log_mel + 4.0) / 4.0)[0]


@lru_cache(maxsize=8)
def _s3gen_mel_basis_and_window(device: torch.device) -> tuple[Tensor, Tensor]:
    basis = librosa.filters.mel(
        sr=S3GEN_SR, n_fft=S3GEN_N_FFT, n_mels=S3GEN_MEL_BINS, fmin=0.0, fmax=S3GEN_FMAX
    )
    return torch.from_numpy(basis).float().to(device), torch.hann_window(S3GEN_N_FFT, device=device)


def s3gen_mel(wav_24k: Tensor) -> Tensor:
    """S3Gen's natural-log mel of a 24 kHz waveform (turbo-spec 5.1.1).

    (N,) -> (N // 480, 80) float32, frames along the first axis (the layout of ``prompt_feat``).
    """
    mel_basis, window = _s3gen_mel_basis_and_window(wav_24k.device)
    pad = (S3GEN_N_FFT - S3GEN_HOP) // 2
    padded = torch.nn.functional.pad(wav_24k[None, None], (pad, pad), mode="reflect")[0]
    stft = torch.stft(padded, S3GEN_N_FFT, S3GEN_HOP, window=window, center=False, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(stft).pow(2).sum(-1) + 1e-9)
    mel = torch.matmul(mel_basis, magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))[0].T


def kaldi_fbank_cmn(wav_16k: Tensor) -> Tensor:
    """CAMPPlus input: Kaldi log filter bank with per-utterance mean removed (turbo-spec 5.2).

    (N,) at 16 kHz, N >= 400 -> (1 + (N - 400) // 160, 80).
    """
    fbank = kaldi.fbank(wav_16k[None], num_mel_bins=FBANK_BINS)
    return fbank - fbank.mean(dim=0, keepdim=True)


@lru_cache(maxsize=4)
def _voice_encoder_mel_basis(n_mels: int) -> np.ndarray:
    return librosa.filters.mel(sr=S3_SR, n_fft=VE_N_FFT, n_mels=n_mels, fmin=0.0, fmax=8000.0)


def voice_encoder_mel(wav_16k: np.ndarray, n_mels: int) -> np.ndarray:
    """The voice encoder's linear power mel (no log) of a 16 kHz waveform (turbo-spec 6).

    (N,) float32 -> (1 + N // 160, n_mels) float32.
    """
    stft = librosa.stft(wav_16k, n_fft=VE_N_FFT, hop_length=VE_HOP, win_length=VE_N_FFT, pad_mode="reflect")
    power = np.abs(stft) ** 2
    return np.dot(_voice_encoder_mel_basis(n_mels), power).T
