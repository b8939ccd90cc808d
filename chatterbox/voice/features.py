"""Audio front ends of voice conditioning: resamplers, spectrograms, filter banks (turbo-spec 4, 5.1, 5.2, 6).

Each function reproduces the reference's arithmetic step for step (same operation order), because
the speech tokenizer rounds its outputs and small float differences in a feature could move a token
across a rounding boundary. The reference's windowed-sinc resampler and Kaldi filter bank come from
torch's audio extension package, whose wheels each load only beside the one torch build they were
compiled for; both are written here in plain torch (the parity suite checks them against it).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from chatterbox.constants import S3_SR, S3GEN_MEL_BINS, S3GEN_SR

TOKENIZER_HOP = 160  # 100 log-mel frames per second at 16 kHz
S3GEN_N_FFT = 1920
S3GEN_HOP = 480  # 50 mel frames per second at 24 kHz
S3GEN_FMAX = 8000.0
FBANK_BINS = 80
VE_N_FFT = 400
VE_HOP = 160


# Resampling 24 kHz -> 16 kHz: the reference uses two different resamplers (turbo-spec 1.1)


def soxr_resample_24k_to_16k(wav_24k: np.ndarray) -> np.ndarray:
    """librosa's default (soxr_hq) resampler; feeds the T3 prompt tokens and the voice encoder.

    (N,) float32 -> (ceil(2N/3),) float32.
    """
    import librosa  # here, not at the top: the GPU suite runs the model without librosa

    return librosa.resample(wav_24k, orig_sr=S3GEN_SR, target_sr=S3_SR)


# Windowed-sinc resampling (Hann window, 6 zero crossings, cutoff at 99 % of the lower Nyquist
# rate): the reference's default `Resample`, for the 24 kHz -> 16 kHz ratio alone (3 -> 2).
SINC_ZERO_CROSSINGS = 6
SINC_ROLLOFF = 0.99
_SINC_IN, _SINC_OUT = S3GEN_SR // math.gcd(S3GEN_SR, S3_SR), S3_SR // math.gcd(S3GEN_SR, S3_SR)


@lru_cache(maxsize=8)
def _sinc_kernel(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Polyphase kernel (out phases, 1, taps) and its half-width in input samples.

    Built in float64 and rounded once to ``dtype``, as the reference's transform caches it.
    """
    cutoff = min(_SINC_IN, _SINC_OUT) * SINC_ROLLOFF  # in units of the common rate (8 kHz here)
    width = math.ceil(SINC_ZERO_CROSSINGS * _SINC_IN / cutoff)
    taps = torch.arange(-width, width + _SINC_IN, dtype=torch.float64) / _SINC_IN  # (taps,)
    phases = -torch.arange(_SINC_OUT, dtype=torch.float64)[:, None, None] / _SINC_OUT  # (out, 1, 1)
    t = ((phases + taps) * cutoff).clamp(-SINC_ZERO_CROSSINGS, SINC_ZERO_CROSSINGS)  # (out, 1, taps)
    window = torch.cos(t * math.pi / SINC_ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * window * (cutoff / _SINC_IN)
    return kernel.to(device=device, dtype=dtype), width


def sinc_resample_24k_to_16k(wav_24k: Tensor) -> Tensor:
    """Windowed-sinc 24 kHz -> 16 kHz; feeds S3Gen's prompt tokens and the x-vector.

    (..., N) float -> (..., ceil(2N/3)), same device and dtype.
    """
    kernel, width = _sinc_kernel(wav_24k.device, wav_24k.dtype)
    lead, n = wav_24k.shape[:-1], wav_24k.shape[-1]
    padded = torch.nn.functional.pad(wav_24k.reshape(-1, 1, n), (width, width + _SINC_IN))  # (B, 1, N')
    phases = torch.nn.functional.conv1d(padded, kernel, stride=_SINC_IN)  # (B, out, frames)
    out = phases.transpose(1, 2).reshape(padded.shape[0], -1)  # phases interleaved in time order
    return out[:, : math.ceil(_SINC_OUT * n / _SINC_IN)].reshape(*lead, -1)


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


def mel_filters(sr: int, n_fft: int, n_mels: int, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32: librosa's default mel filter bank (Slaney's mel scale and
    area normalisation, from 0 Hz), bit for bit, without librosa."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    max_mel = min_log_mel + np.log(fmax / min_log_hz) / logstep if fmax >= min_log_hz else fmax / f_sp
    mels = np.linspace(0.0, max_mel, n_mels + 2)
    hz = np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)
    ramps = hz[:, None] - np.fft.rfftfreq(n_fft, 1.0 / sr)  # (n_mels + 2, bins)
    gaps = np.diff(hz)[:, None]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / gaps[:-1], ramps[2:] / gaps[1:])).astype(np.float32)
    weights *= (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights


@lru_cache(maxsize=8)
def _s3gen_mel_basis_and_window(device: torch.device) -> tuple[Tensor, Tensor]:
    basis = mel_filters(S3GEN_SR, S3GEN_N_FFT, S3GEN_MEL_BINS, S3GEN_FMAX)
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


# Kaldi filter bank with the options CAMPPlus uses (Kaldi's defaults at 16 kHz, no dither): 25 ms
# frames every 10 ms that end inside the signal, DC removed, pre-emphasis 0.97, Povey window,
# zero-padded to a 512-point FFT, power spectrum, 80 triangular mel bins on Kaldi's mel scale
# from 20 Hz to Nyquist, natural log floored at float32 epsilon.
FBANK_FRAME = 400
FBANK_SHIFT = 160
FBANK_FFT = 512
FBANK_PREEMPHASIS = 0.97
FBANK_LOW_HZ = 20.0


def _kaldi_mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


@lru_cache(maxsize=8)
def _fbank_weights(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Povey window (frame,) and mel weights (FFT/2 + 1, bins); the Nyquist bin has weight 0.

    Band edges are spaced evenly in mel between 20 Hz and Nyquist (scalars in float64, bands in
    float32, as Kaldi's tables are computed).
    """
    window = torch.hann_window(FBANK_FRAME, periodic=False, dtype=torch.float32).pow(0.85)
    mel_low = _kaldi_mel(FBANK_LOW_HZ)
    step = (_kaldi_mel(S3_SR / 2) - mel_low) / (FBANK_BINS + 1)
    band = torch.arange(FBANK_BINS, dtype=torch.float32)[:, None]  # (bins, 1)
    left, centre, right = (mel_low + (band + k) * step for k in (0.0, 1.0, 2.0))
    bin_hz = S3_SR / FBANK_FFT * torch.arange(FBANK_FFT // 2, dtype=torch.float32)  # (FFT/2,)
    bin_mel = 1127.0 * (1.0 + bin_hz / 700.0).log()
    rising, falling = (bin_mel - left) / (centre - left), (right - bin_mel) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (bins, FFT/2)
    weights = torch.nn.functional.pad(weights, (0, 1))  # (bins, FFT/2 + 1)
    return window.to(device=device, dtype=dtype), weights.T.contiguous().to(device=device, dtype=dtype)


def kaldi_fbank(wav_16k: Tensor) -> Tensor:
    """Kaldi log mel filter bank (turbo-spec 5.2). (..., N) at 16 kHz, N >= 400 -> (..., frames, 80)."""
    window, weights = _fbank_weights(wav_16k.device, wav_16k.dtype)
    frames = wav_16k.unfold(-1, FBANK_FRAME, FBANK_SHIFT)  # (..., 1 + (N - 400) // 160, 400)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # the first sample repeats
    frames = (frames - FBANK_PREEMPHASIS * previous) * window
    frames = torch.nn.functional.pad(frames, (0, FBANK_FFT - FBANK_FRAME))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (..., frames, FFT/2 + 1)
    eps = torch.tensor(torch.finfo(torch.float32).eps, device=wav_16k.device, dtype=wav_16k.dtype)
    return torch.maximum(power @ weights, eps).log()


def kaldi_fbank_cmn(wav_16k: Tensor) -> Tensor:
    """CAMPPlus input: Kaldi log filter bank with per-utterance mean removed (turbo-spec 5.2).

    (..., N) at 16 kHz, N >= 400 -> (..., 1 + (N - 400) // 160, 80).
    """
    fbank = kaldi_fbank(wav_16k)
    return fbank - fbank.mean(dim=-2, keepdim=True)


@lru_cache(maxsize=4)
def _voice_encoder_mel_basis(n_mels: int) -> np.ndarray:
    return mel_filters(S3_SR, VE_N_FFT, n_mels, 8000.0)


def voice_encoder_mel(wav_16k: np.ndarray, n_mels: int) -> np.ndarray:
    """The voice encoder's linear power mel (no log) of a 16 kHz waveform (turbo-spec 6).

    (N,) float32 -> (1 + N // 160, n_mels) float32.
    """
    import librosa  # here for the reason in soxr_resample_24k_to_16k

    stft = librosa.stft(wav_16k, n_fft=VE_N_FFT, hop_length=VE_HOP, win_length=VE_N_FFT, pad_mode="reflect")
    power = np.abs(stft) ** 2
    return np.dot(_voice_encoder_mel_basis(n_mels), power).T
