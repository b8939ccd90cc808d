"""torchaudio's resampler and Kaldi filter bank, as upstream calls them (runs in ``.venv-ref`` only).

Our ``chatterbox.features`` re-implements both in plain torch; these tasks give the oracle values.
Inputs: tensors ``wav_<i>`` (1-D float32); outputs the same keys.
"""

from __future__ import annotations

import torch
import torchaudio
from torchaudio.compliance import kaldi


def resample(tensors: dict[str, torch.Tensor], params: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """24 kHz -> 16 kHz with the transform upstream's S3Gen builds (default options)."""
    resampler = torchaudio.transforms.Resample(24_000, 16_000)
    return {k: resampler(v[None])[0] for k, v in tensors.items()}, {"torchaudio": torchaudio.__version__}


def fbank(tensors: dict[str, torch.Tensor], params: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The filter bank upstream's CAMPPlus computes (80 bins, Kaldi defaults otherwise)."""
    out = {k: kaldi.fbank(v[None], num_mel_bins=80) for k, v in tensors.items()}
    return out, {"torchaudio": torchaudio.__version__}
