"""S3Gen.compile on the tiny checkpoint: compiled vs eager within a bound, eager on a compile error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.s3gen.compiled import Bucketed
from tests.s3gen_requests import random_request

# fp32 CPU: inductor reorders sums (measured 3e-6 of peak on the tiny model); 1e-4 still catches a
# wrong mask or a row cut at the bucket (those differ by the signal's own level).
COMPILED_ERROR = 1e-4


def make_request(n_prompt: int, n_speech: int, seed: int, odd: bool = False) -> S3GenRequest:
    return random_request(seed, n_prompt, n_speech, seed, odd)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh inductor cache: a half-written one from another process must not be read."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


def test_compiled_s3gen_matches_eager_on_every_row(tiny_checkpoint: Path, inductor_cache):
    eager = S3Gen.from_file(tiny_checkpoint / "s3gen_meanflow.safetensors")
    compiled = S3Gen.from_file(tiny_checkpoint / "s3gen_meanflow.safetensors")
    # Flow rows of 2 * (P + N + 3) frames <= 256 and speech mels <= 64 frames: one bucket each.
    requests = [make_request(40, 20, 1), make_request(30, 9, 2, odd=True)]
    # `warm` names frame counts for both modules: 46 frames fall in flow's 256 and HiFT's 64 buckets.
    report = compiled.compile(batch_sizes=(2,), warm=[2 * 23])
    assert report.errors == ()
    assert report.shapes == 2 and report.seconds > 0  # flow at batch 2, HiFT at batch 1
    assert compiled.flow.decoder.compiled.bucket(2 * 63) == 256
    assert compiled.compiled_vocoder.bucket(2 * 23) == 64
    expected = eager.generate(requests)
    # Every shape here was warmed, so serving them compiles nothing more (a recompile would raise,
    # and the module fall back to eager).
    with torch._dynamo.config.patch(error_on_recompile=True):
        wavs = compiled.generate(requests)
    assert compiled.flow.decoder.compiled.error is None and compiled.compiled_vocoder.error is None
    for wav, solo in zip(wavs, expected, strict=True):
        assert wav.shape == solo.shape
        assert float((wav - solo).abs().max()) <= COMPILED_ERROR * float(solo.abs().max())
    # Past the largest bucket the eager modules run, exactly.
    compiled.flow.decoder.compiled.buckets = [64]
    compiled.compiled_vocoder.buckets = [8]
    long = [dataclasses.replace(requests[0], seed=5)]
    assert torch.equal(compiled.generate(long)[0], eager.generate(long)[0])


def test_a_compile_error_warns_and_runs_eager(inductor_cache):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.Tanh())  # tanh: a C++ kernel
    bucketed = Bucketed(
        "test conv",
        conv,
        [16],
        length=lambda x: x.shape[-1],
        pad=lambda bucket, x: (torch.nn.functional.pad(x, (0, bucket - x.shape[-1])),),
        trim=lambda out, length: out[..., :length],
    )
    x = torch.randn(2, 3, 11)
    # No usable C++ compiler: inductor's CPU code cannot be built.
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="torch.compile of S3Gen's test conv failed, running eager"):
            out = bucketed(x)
        assert bucketed.error is not None
        assert torch.equal(out, conv(x))
        assert torch.equal(bucketed(x), conv(x))  # eager from then on, no second warning needed
