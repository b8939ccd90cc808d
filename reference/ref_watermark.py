"""PerTh's own implicit watermarker (runs in ``.venv-ref`` only, where its model code can import).

Inputs: tensors ``wav_<i>`` (1-D float32 at 24 kHz); outputs ``marked_<i>`` and ``score_<i>`` (the
detector's unrounded confidence on the marked audio) and ``clean_<i>`` (on the input).
"""

from __future__ import annotations

import numpy as np
import perth
import torch


def mark(tensors: dict[str, torch.Tensor], params: dict) -> tuple[dict[str, torch.Tensor], dict]:
    watermarker = perth.PerthImplicitWatermarker()
    out = {}
    for key, wav in tensors.items():
        suffix = key.removeprefix("wav_")
        marked = np.asarray(watermarker.apply_watermark(wav.numpy(), sample_rate=24_000), dtype=np.float32)
        out[f"marked_{suffix}"] = torch.from_numpy(marked)
        for name, audio in (("score", marked), ("clean", wav.numpy())):
            score = watermarker.get_watermark(audio, sample_rate=24_000, round=False)
            out[f"{name}_{suffix}"] = torch.tensor([float(score)])
    return out, {}
