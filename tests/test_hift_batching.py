"""Length-masked HiFT batches: every row equals its solo waveform, last frames included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatterbox.s3gen import S3Gen, S3GenRequest
from chatterbox.s3gen.hift import HiFT, HiFTConfig, draw_source_noise
from chatterbox.s3gen.s3gen import vocode_batched, vocode_padded
from chatterbox.s3gen.streaming import HopSchedule, StreamingS3Gen
from chatterbox.testing import SIZES
from tests.s3gen_requests import random_request

EXACT = 1e-5  # of each row's solo peak


def solo_and_batched(hift: HiFT, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mels = [torch.randn(80, n, generator=g) * 2 - 6 for n in lengths]
    phases, sources = zip(*(draw_source_noise(n, g) for n in lengths), strict=True)
    with torch.inference_mode():
        alone = [hift(m[None], p[None], s[None])[0] for m, p, s in zip(mels, phases, sources, strict=True)]
        batched = vocode_batched(hift, mels, torch.stack(phases), list(sources))
        padded = vocode_padded(hift, mels, torch.stack(phases), list(sources))
    return alone, batched, padded


@pytest.fixture(scope="module", params=["tiny", "nano"])
def hift(request) -> HiFT:
    torch.manual_seed(0)
    channels = SIZES[request.param].hift_channels
    model = HiFT(HiFTConfig(channels=channels, f0_channels=channels))
    model.fold_weight_norm()
    return model


@pytest.mark.parametrize(
    "lengths",
    [[40, 23, 9], [31, 30], [12, 12, 5, 1], [2, 57, 33, 57]],
    ids=["three", "one-frame-apart", "equal-and-one-frame", "longest-twice"],
)
def test_every_row_equals_its_solo_waveform(hift, lengths):
    alone, batched, padded = solo_and_batched(hift, lengths)
    leaked = 0.0
    for n, wav, solo, naive in zip(lengths, batched, alone, padded, strict=True):
        assert wav.shape == solo.shape == (480 * n,)
        peak = float(solo.abs().max())
        assert peak > 0
        assert float((wav - solo).abs().max()) <= EXACT * peak, n
        # the last 8 frames too (they are where unmasked padding leaks in)
        assert float((wav[-480 * 8 :] - solo[-480 * 8 :]).abs().max()) <= EXACT * peak
        leaked = max(leaked, float((naive - solo).abs().max()) / peak)
    if len(set(lengths)) > 1:
        assert leaked > 100 * EXACT  # without the lengths the same batch is not exact: the test can fail


def test_equal_lengths_take_the_unmasked_path(hift):
    alone, batched, _ = solo_and_batched(hift, [17, 17, 17], seed=3)
    for wav, solo in zip(batched, alone, strict=True):
        assert float((wav - solo).abs().max()) <= EXACT * float(solo.abs().max())


def make_request(n_prompt: int, n_speech: int, seed: int, odd: bool = False) -> S3GenRequest:
    return random_request(seed, n_prompt, n_speech, seed, odd)


def test_s3gen_batched_vocoder_on_cpu_gives_each_request_its_solo_audio(tiny_checkpoint: Path):
    model = S3Gen.from_file(tiny_checkpoint / "s3gen_meanflow.safetensors")
    assert not model.batch_vocoder  # CPU default: one mel at a time
    requests = [make_request(20, 30, 1), make_request(25, 7, 2, odd=True), make_request(10, 44, 3)]
    alone = [model.generate([r])[0] for r in requests]
    model.batch_vocoder = True  # forces the batched path here
    batched = model.generate(requests)
    for wav, solo in zip(batched, alone, strict=True):
        assert wav.shape == solo.shape
        assert float((wav - solo).abs().max()) <= EXACT * float(solo.abs().max())


def test_streams_vocoded_in_one_batch_equal_streams_vocoded_alone(tiny_checkpoint: Path):
    model = S3Gen.from_file(tiny_checkpoint / "s3gen_meanflow.safetensors")
    # Different lengths and an odd prompt: the streams' hops and final segments differ in length.
    requests = [make_request(20, 45, 4), make_request(15, 23, 5, odd=True), make_request(30, 70, 6)]
    streaming = StreamingS3Gen(model, HopSchedule())
    alone = streaming.stream_tokens(requests, tokens_per_push=5)
    model.batch_vocoder = True
    batched = streaming.stream_tokens(requests, tokens_per_push=5)
    for pieces, solo_pieces in zip(batched, alone, strict=True):
        assert [p.numel() for p in pieces] == [p.numel() for p in solo_pieces]
        wav, solo = torch.cat(pieces), torch.cat(solo_pieces)
        assert float((wav - solo).abs().max()) <= EXACT * float(solo.abs().max())
