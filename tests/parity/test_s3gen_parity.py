"""S3Gen against upstream ``S3Gen.inference`` on the full-size checkpoint (fp32, CPU).

One batched call of ours covers every case (different prompt and speech lengths, an odd-length
prompt mel); the reference runs each case alone after ``torch.manual_seed(seed)``. Our seeded
draws follow the reference's RNG order, so both sides use the same noise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.s3gen.hift import draw_source_noise
from reference.oracle import run_reference
from tests.model_probes import s3gen_encoder_outputs

pytestmark = pytest.mark.parity

# (prompt tokens, prompt mel frames, speech tokens, seed): a 10 s prompt with 3, 7 and 12 s of
# speech, and a shorter prompt whose mel has an odd length (turbo-spec 9).
CASES = [(250, 500, 75, 11), (250, 500, 175, 22), (250, 500, 300, 33), (180, 361, 175, 44)]
ATOL = 1e-4


def _case_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for k, (n_prompt, n_frames, n_speech, _) in enumerate(CASES):
        tensors[f"speech_tokens_{k}"] = torch.randint(0, 6561, (n_speech,), generator=g)
        tensors[f"prompt_tokens_{k}"] = torch.randint(0, 6561, (n_prompt,), generator=g)
        tensors[f"prompt_feat_{k}"] = torch.randn(n_frames, 80, generator=g) * 2 - 6  # log-mel-like
        tensors[f"embedding_{k}"] = torch.randn(192, generator=g)
    return tensors


@pytest.fixture(scope="module")
def requests() -> list[S3GenRequest]:
    t = _case_tensors()
    return [
        S3GenRequest(
            t[f"speech_tokens_{k}"], t[f"prompt_tokens_{k}"], t[f"prompt_feat_{k}"], t[f"embedding_{k}"], seed
        )
        for k, (*_, seed) in enumerate(CASES)
    ]


@pytest.fixture(scope="module")
def reference(full_checkpoint: Path) -> dict[str, torch.Tensor]:
    out, _ = run_reference(
        "s3gen.inference", _case_tensors(), ckpt_dir=str(full_checkpoint), seeds=[c[-1] for c in CASES]
    )
    return out


@pytest.fixture(scope="module")
def model(full_checkpoint: Path) -> S3Gen:
    return S3Gen.from_file(full_checkpoint / "s3gen_meanflow.safetensors")


@pytest.fixture(scope="module")
def ours(model: S3Gen, requests: list[S3GenRequest]) -> dict[str, list[torch.Tensor]]:
    noise = model.noise_for(requests)
    mels = model.mels(requests, noise)
    with torch.inference_mode():
        sources = [
            model.mel2wav.source(m[None], n.phases[None], n.source[None])[0, 0]
            for m, n in zip(mels, noise, strict=True)
        ]
    return {
        "noise": [n.flow for n in noise],
        "encoder": s3gen_encoder_outputs(model, requests),
        "mel": mels,
        "source": sources,
        "wav": model.vocode(mels, noise),
    }


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_seeded_noise_follows_the_reference_rng_order(ours, reference):
    for k in range(len(CASES)):
        assert torch.equal(ours["noise"][k], reference[f"flow_noise_{k}"]), k


@pytest.mark.parametrize("name", ["encoder", "mel"])
def test_encoder_and_mel_match(ours, reference, name):
    for k in range(len(CASES)):
        assert _max_error(ours[name][k], reference[f"{name}_{k}"]) < ATOL, (name, k)


def test_odd_prompt_mel_returns_one_frame_less(ours, reference):
    n_speech_frames = 2 * (CASES[3][2] + 3)
    assert ours["mel"][3].shape == (80, n_speech_frames - 1) == reference["mel_3"].shape


def test_source_and_waveform_match_relative_to_peak(ours, reference):
    for k, (*_, n_speech, _) in enumerate(CASES):
        wav, ref_wav = ours["wav"][k].cpu(), reference[f"wav_{k}"]
        assert wav.shape == ref_wav.shape
        assert _max_error(wav, ref_wav) / ref_wav.abs().max().item() < ATOL, k
        source, ref_source = ours["source"][k], reference[f"source_{k}"]
        assert _max_error(source, ref_source) / ref_source.abs().max().item() < ATOL, k
        if k < 3:
            assert wav.numel() == 960 * (n_speech + 3)


def test_voiced_vocoder_matches(full_checkpoint: Path, model: S3Gen, reference):
    """The checkpoint's F0 is below the voicing threshold; raising it exercises the harmonic source."""
    offset, seeds = 150.0, [5, 6]
    mels = {"mel_0": reference["mel_1"][:, :200], "mel_1": reference["mel_2"][:, 200:400].contiguous()}
    ref, _ = run_reference(
        "s3gen.vocoder_voiced", mels, ckpt_dir=str(full_checkpoint), seeds=seeds, f0_offset=offset
    )
    vocoder = copy.deepcopy(model.mel2wav)
    with torch.no_grad():
        vocoder.f0_predictor.classifier.bias += offset
    for k, seed in enumerate(seeds):
        mel = mels[f"mel_{k}"][None]
        phases, noise = draw_source_noise(mel.shape[-1], torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            f0 = vocoder.f0_predictor(mel)[0]
            source = vocoder.source(mel, phases[None], noise[None])[0, 0]
            wav = vocoder(mel, phases[None], noise[None])[0]
        assert (f0 > 10).all()
        assert _max_error(f0, ref[f"f0_{k}"]) < 1e-3
        assert _max_error(source, ref[f"source_{k}"]) < 1e-5
        assert _max_error(wav, ref[f"wav_{k}"]) / ref[f"wav_{k}"].abs().max().item() < 1e-5
