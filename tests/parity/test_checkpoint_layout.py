"""The full fixture checkpoint has exactly the reference modules' state-dict keys, shapes and dtypes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reference.oracle import run_reference

pytestmark = pytest.mark.parity

WEIGHT_FILES = ("t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors")
EXPECTED_KEYS = {"t3_turbo_v1.safetensors": 299, "s3gen_meanflow.safetensors": 2491, "ve.safetensors": 16}


@pytest.fixture(scope="module")
def reference_layout() -> dict:
    _, layout = run_reference("checkpoint.module_layout")
    return layout


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.parametrize("file", WEIGHT_FILES)
def test_keys_shapes_and_dtypes_equal_reference_modules(
    full_checkpoint: Path, reference_layout: dict, file: str
):
    ours = _file_tensors(full_checkpoint / file)
    ref = reference_layout[file]
    assert len(ours) == EXPECTED_KEYS[file]
    assert sorted(ours) == sorted(ref)
    for key, tensor in ours.items():
        assert list(tensor.shape) == ref[key]["shape"], key
        # The official file stores the CAMPPlus batch counters as F32; the modules hold int64.
        expected_dtype = "float32" if key.endswith("num_batches_tracked") else ref[key]["dtype"]
        assert str(tensor.dtype).removeprefix("torch.") == expected_dtype, key


@pytest.mark.parametrize("file", WEIGHT_FILES)
def test_random_weights_have_the_modules_initial_scales(
    full_checkpoint: Path, reference_layout: dict, file: str
):
    """Per-tensor mean and spread match the reference modules' own initialisation (to sampling error),
    so activations stay in the range real weights give and parity tolerances mean something."""
    ours = _file_tensors(full_checkpoint / file)
    mismatched = []
    for key, tensor in ours.items():
        ref = reference_layout[file][key]
        n = tensor.numel()
        if n < 64:
            continue
        std, mean = float(tensor.float().std()), float(tensor.float().mean())
        if ref["std"] == 0.0:  # constants: norms, running stats, snake alphas
            ok = std == 0.0 and mean == ref["mean"]
        else:
            # Both sides are samples: allow ~5 standard errors of each statistic, at least 10 %.
            std_ok = math.isclose(std, ref["std"], rel_tol=max(0.1, 5 / math.sqrt(2 * n)))
            mean_ok = abs(mean - ref["mean"]) <= 7 * ref["std"] / math.sqrt(n) + 1e-3 * abs(ref["mean"])
            ok = std_ok and mean_ok
        if not ok:
            mismatched.append((key, n, std, ref["std"], mean, ref["mean"]))
    assert not mismatched, mismatched[:20]


def test_reference_loads_the_fixture_strictly(full_checkpoint: Path):
    _, loaded = run_reference("checkpoint.load_strict", ckpt_dir=str(full_checkpoint))
    # T3 after upstream deletes the unused wte (478,862,755 - 51,482,624), S3Gen and VE as in the spec.
    assert loaded["parameters"] == {"t3": 427_380_131, "s3gen": 266_030_919, "ve": 1_423_618}
    assert loaded["conds_t3_keys"] == sorted(
        ["speaker_emb", "clap_emb", "cond_prompt_speech_tokens", "cond_prompt_speech_emb", "emotion_adv"]
    )
    assert loaded["conds_gen_keys"] == sorted(
        ["prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding"]
    )
