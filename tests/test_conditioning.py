"""Voice conditioning on the tiny checkpoint: shapes, cuts, batching, determinism, loading, bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox.constants import SPEECH_VOCAB_SIZE
from chatterbox.voice.campplus import CAMPPlusConfig
from chatterbox.voice.conditioning import VoiceConditioner
from chatterbox.voice.features import tokenizer_log_mel
from chatterbox.voice.speech_tokenizer import FSQ_SHRINK, FSQuantizer, SpeechTokenizerConfig
from chatterbox.voice.voice_encoder import VoiceEncoderConfig, partial_starts
from chatterbox.weights import CheckpointError, read_safetensors
from tests.model_probes import conditioner_from_files

SR = 24_000


def reference(seconds: float, seed: int) -> np.ndarray:
    """A gliding harmonic tone with syllable-rate envelopes and noise bursts, at 24 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 15 * seed + 30 * np.sin(2 * np.pi * 0.4 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t + seed), 0, None)
    bursts = (np.sin(2 * np.pi * 0.7 * t) > 0.8) * rng.standard_normal(t.shape[0])
    wav = voiced * envelope + 0.5 * bursts + 0.002 * rng.standard_normal(t.shape[0])
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


@pytest.fixture(scope="module")
def conditioner(tiny_checkpoint: Path) -> VoiceConditioner:
    return conditioner_from_files(
        tiny_checkpoint / "s3gen_meanflow.safetensors", tiny_checkpoint / "ve.safetensors"
    )


@pytest.fixture(scope="module")
def refs() -> list[np.ndarray]:
    # 6 s; 16 s (past both the 10 s and 15 s cuts); 6 s + 500 samples (odd S3Gen mel length)
    return [reference(6.0, 0), reference(16.0, 1), reference(6.0, 2)[: 6 * SR - 1000]]


@pytest.fixture(scope="module")
def batched(conditioner, refs):
    return conditioner.condition(refs)


def test_dims_are_read_from_the_tensors(conditioner):
    assert conditioner.speech_tokenizer.cfg == SpeechTokenizerConfig(
        n_fft=400, n_mels=128, width=128, n_heads=2, n_blocks=6, fsmn_kernel=31, fsq_dims=8
    )
    assert conditioner.campplus.cfg == CAMPPlusConfig(
        head_channels=8, init_channels=32, growth=8, bottleneck=32, block_layers=(12, 24, 16), embed_dim=192
    )
    assert conditioner.voice_encoder.cfg == VoiceEncoderConfig(n_mels=40, hidden=64, n_layers=3, embed_dim=64)


def test_shapes_cuts_and_ranges(batched, refs):
    for cond, wav in zip(batched, refs, strict=True):
        n_16k = math.ceil(len(wav) * 2 / 3)
        n_t3 = math.ceil(math.ceil(min(n_16k, 240_000) // 160 / 2) / 2)
        n_mel = min(len(wav), 240_000) // 480
        assert cond.speaker_emb.shape == (64,) and cond.speaker_emb.dtype == torch.float32
        assert float(cond.speaker_emb.norm()) == pytest.approx(1.0, abs=1e-5)
        assert cond.t3_prompt_tokens.shape == (min(n_t3, 375),) and cond.t3_prompt_tokens.dtype == torch.int64
        assert cond.prompt_feat.shape == (n_mel, 80) and cond.prompt_feat.dtype == torch.float32
        assert cond.prompt_tokens.shape == (n_mel // 2,) and cond.prompt_tokens.dtype == torch.int64
        assert cond.embedding.shape == (192,) and cond.embedding.dtype == torch.float32
        for tokens in (cond.t3_prompt_tokens, cond.prompt_tokens):
            assert int(tokens.min()) >= 0 and int(tokens.max()) < SPEECH_VOCAB_SIZE
    assert batched[1].t3_prompt_tokens.shape == (375,)  # 15 s cut
    assert batched[1].prompt_feat.shape == (500, 80)  # 10 s cut
    # 143000 samples: 297 mel frames, but 149 tokens from the 16 kHz audio -> cut to 148.
    assert batched[2].prompt_feat.shape == (297, 80) and batched[2].prompt_tokens.shape == (148,)


def test_batch_equals_one_at_a_time(conditioner, refs, batched):
    for wav, cond in zip(refs, batched, strict=True):
        alone = conditioner.condition([wav])[0]
        assert torch.equal(alone.t3_prompt_tokens, cond.t3_prompt_tokens)
        assert torch.equal(alone.prompt_tokens, cond.prompt_tokens)
        assert torch.equal(alone.prompt_feat, cond.prompt_feat)
        assert torch.equal(alone.embedding, cond.embedding)
        torch.testing.assert_close(alone.speaker_emb, cond.speaker_emb, atol=1e-6, rtol=0)


def test_deterministic(conditioner, refs):
    first, second = (conditioner.condition([refs[2]])[0] for _ in range(2))
    for name in vars(first):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_different_voices_differ(batched):
    a, b = batched[0], batched[2]
    assert not torch.equal(a.t3_prompt_tokens[:100], b.t3_prompt_tokens[:100])
    assert not torch.allclose(a.embedding, b.embedding, atol=1e-4)


def test_batched_tokenize_matches_single_away_from_rounding_boundaries(conditioner, refs):
    tokenizer = conditioner.speech_tokenizer
    wavs = [torch.from_numpy(w[::3].copy()) for w in refs]  # any 16 kHz audio will do
    tokens, lens = tokenizer.tokenize(wavs)
    for i, wav in enumerate(wavs):
        mel_frames = wav.shape[0] // 160
        assert int(lens[i]) == math.ceil(math.ceil(mel_frames / 2) / 2)
        alone, alone_len = tokenizer.tokenize([wav])
        assert int(alone_len[0]) == int(lens[i]) == alone.shape[1]
        assert torch.equal(tokens[i, lens[i] :], torch.zeros_like(tokens[i, lens[i] :]))  # padding
        # Batching only changes float summation order: tokens may differ only at near-ties.
        assert (tokens[i, : lens[i]] != alone[0]).float().mean() < 0.01


def test_tokenize_max_len_cuts_the_mel_after_normalising(conditioner, refs):
    tokenizer = conditioner.speech_tokenizer
    loud_tail = np.concatenate([0.01 * refs[0][::3][: 40 * 640], refs[1][::3]])  # quiet start, loud rest
    wav = torch.from_numpy(loud_tail)
    cut, cut_len = tokenizer.tokenize([wav], max_len=40)
    assert cut.shape == (1, 40) and int(cut_len[0]) == 40
    mel = tokenizer_log_mel(wav, tokenizer._mel_filters, tokenizer.window)[:, :160]  # 4 frames per token
    expected, _ = tokenizer(mel[None], torch.tensor([160]))
    assert torch.equal(cut, expected)
    # Normalising the cut audio alone (peak 40 dB lower) gives other tokens.
    alone, _ = tokenizer.tokenize([wav[: 40 * 640]])
    assert not torch.equal(cut, alone)


def test_fsq_digits_are_base3_token_ids():
    quantizer = FSQuantizer(SpeechTokenizerConfig(width=8))
    with torch.no_grad():
        quantizer.project_down.weight.copy_(torch.eye(8))
        quantizer.project_down.bias.zero_()
    digits = torch.tensor([[0, 1, 2, 2, 1, 0, 0, 2], [2] * 8, [0] * 8])
    # tanh(h) * 0.999 lands on -0.8, 0 or +0.8 -> rounds to -1, 0, 1 -> digit 0, 1, 2
    hidden = torch.atanh((digits.float() - 1) * 0.8 / FSQ_SHRINK)
    tokens = quantizer(hidden[None])[0]
    assert tokens.tolist() == [int(sum(d * 3**i for i, d in enumerate(row))) for row in digits.tolist()]
    assert tokens.tolist()[1:] == [SPEECH_VOCAB_SIZE - 1, 0]


@pytest.mark.parametrize(
    ("n_frames", "starts"),
    [
        (50, [0]),  # shorter than one partial: one zero-padded partial
        (160, [0]),
        (236, [0, 77]),  # last partial 99% covered: kept
        (247, [0, 77]),  # a third partial would be 58% covered: dropped
        (300, [0, 77, 154]),  # 89% covered: kept
    ],
)
def test_voice_encoder_partials(n_frames, starts):
    assert partial_starts(n_frames, VoiceEncoderConfig()) == starts


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 48_000), np.float32), "mono 1-D"),
        (np.zeros(0, np.float32), "shorter than two speech tokens"),
        (np.zeros(1919, np.float32), "shorter than two speech tokens"),
        (np.zeros(48_000, np.int16), "floating-point"),
        (np.full(48_000, np.nan, np.float32), "NaN"),
        (torch.zeros(48_000), "numpy array"),
    ],
)
def test_condition_rejects_bad_references(conditioner, bad, message):
    with pytest.raises(ValueError, match=message):
        conditioner.condition([reference(6.0, 0), bad])


def test_shortest_and_silent_references_give_finite_conditionals(conditioner):
    shortest = reference(6.0, 3)[: 2 * 960]
    for cond in conditioner.condition([shortest, np.zeros(6 * SR, np.float32)]):
        for name, value in vars(cond).items():
            assert torch.isfinite(value.float()).all(), name
    assert cond.prompt_tokens.shape == (150,)


def test_condition_rejects_an_empty_list(conditioner):
    with pytest.raises(ValueError, match="at least one reference"):
        conditioner.condition([])


@pytest.mark.parametrize(
    ("wavs", "max_len", "message"),
    [
        ([], None, "at least one"),
        ([torch.zeros(2, 16_000)], None, "1-D"),
        ([torch.zeros(639)], None, "at least 640"),
        ([torch.zeros(16_000 * 31)], None, "30 s"),
        ([torch.zeros(16_000)], 0, "max_len"),
    ],
)
def test_tokenize_rejects_bad_input(conditioner, wavs, max_len, message):
    with pytest.raises(ValueError, match=message):
        conditioner.speech_tokenizer.tokenize(wavs, max_len=max_len)


def test_loading_is_strict(tiny_checkpoint):
    s3gen = read_safetensors(tiny_checkpoint / "s3gen_meanflow.safetensors")
    ve = read_safetensors(tiny_checkpoint / "ve.safetensors")
    VoiceConditioner.from_state_dicts(s3gen, ve)
    for key in (
        "tokenizer.window",
        "tokenizer.encoder.blocks.5.mlp.2.bias",
        "speaker_encoder.head.conv1.weight",
        "speaker_encoder.xvector.block3.tdnnd16.linear1.weight",
    ):
        short = key.split(".", 1)[1]
        with pytest.raises(CheckpointError, match=rf"missing \[[^]]*'{re.escape(short)}'"):
            VoiceConditioner.from_state_dicts({k: v for k, v in s3gen.items() if k != key}, ve)
    with pytest.raises(CheckpointError, match=r"missing \['proj.weight'\]"):
        VoiceConditioner.from_state_dicts(s3gen, {k: v for k, v in ve.items() if k != "proj.weight"})
    with pytest.raises(CheckpointError, match=r"unexpected \['lstm.extra'\]"):
        VoiceConditioner.from_state_dicts(s3gen, {**ve, "lstm.extra": torch.zeros(1)})
    extra = {**s3gen, "speaker_encoder.head.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected \['head.extra'\]"):
        VoiceConditioner.from_state_dicts(extra, ve)
    with pytest.raises(CheckpointError, match="not found"):
        conditioner_from_files(tiny_checkpoint / "nope.safetensors", tiny_checkpoint / "ve.safetensors")
