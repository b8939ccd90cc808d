"""Resemble's PerTh implicit watermark, applied to every audio our public paths return by default.

A standalone step so the Serve stitcher can watermark a whole stitched result once, without a
model replica; the watermarker network is loaded lazily, once per process.
"""

from __future__ import annotations

import threading

import numpy as np
import perth
import torch

_lock = threading.Lock()
_watermarker: perth.PerthImplicitWatermarker | None = None


def _get_watermarker() -> perth.PerthImplicitWatermarker:
    global _watermarker
    if _watermarker is None:
        _watermarker = perth.PerthImplicitWatermarker()
    return _watermarker


def apply_watermark(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """The watermarked copy of a mono float waveform (same length, float32)."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"watermarking takes mono audio, got shape {wav.shape}")
    if wav.size == 0:
        return wav
    # Plain no-grad mode even inside a caller's inference_mode: PerTh's weights and activations
    # must not become inference tensors, or later calls outside that mode fail.
    with _lock, torch.inference_mode(False), torch.no_grad():  # one model: calls are not re-entrant
        marked = _get_watermarker().apply_watermark(wav, sample_rate=sample_rate)
    return np.asarray(marked, dtype=np.float32)


def detect_watermark(wav: np.ndarray, sample_rate: int) -> float:
    """PerTh's watermark confidence in [0, 1] (1.0 for our output)."""
    with _lock, torch.inference_mode(False), torch.no_grad():
        return float(
            _get_watermarker().get_watermark(np.asarray(wav, dtype=np.float32), sample_rate=sample_rate)
        )
