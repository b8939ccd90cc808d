"""Deterministic speech-like test signals (voiced harmonics with gliding pitch, noise bursts, pauses)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def speechlike(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Mono float32 audio that exercises every front end like speech would, peak about 0.5."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)) + 20 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 2
    noise = rng.standard_normal(n) * (np.sin(2 * np.pi * 1.3 * t) > 0.8)
    wav = 0.3 * voiced * syllables + 0.05 * noise
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)


def encode(wav: np.ndarray, sample_rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wav, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()
