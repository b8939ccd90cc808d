"""Our plain-torch PerTh network against PerTh's own watermarker (oracle venv), same shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatterbox.watermark import apply_watermark, detect_watermark
from reference.oracle import run_reference
from tests.audio_samples import speechlike

pytestmark = pytest.mark.parity


def test_marked_audio_and_detection_equal_perth():
    inputs = {
        f"wav_{n}": torch.from_numpy(speechlike(n / 24_000, 24_000, seed=i))
        for i, n in enumerate((24_000, 77_777, 240_000))
    }
    expected, _ = run_reference("watermark.mark", inputs)
    for key, wav in inputs.items():
        suffix = key.removeprefix("wav_")
        ours = apply_watermark(wav.numpy(), 24_000)
        theirs = expected[f"marked_{suffix}"].numpy()
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        error = float(np.abs(ours - theirs).max())
        print(f"{suffix} samples: max |marked audio error| {error:.2e}")
        assert error < 1e-4
        # PerTh reports the rounded confidence: 1 on marked audio, 0 on the clean input.
        assert float(expected[f"score_{suffix}"]) > 0.5 and detect_watermark(ours, 24_000) == 1.0
        assert float(expected[f"clean_{suffix}"]) < 0.5 and detect_watermark(wav.numpy(), 24_000) == 0.0
