"""Reference audio decoding and validation, and voice serialisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import torch

from chatterbox.conditioning import VoiceConditionals
from chatterbox.errors import (
    AudioTooLongError,
    InvalidAudioError,
    NonFiniteAudioError,
    SilentAudioError,
    TTSInputError,
    VoiceTooShortError,
)
from chatterbox.voice import Voice, decode_reference_audio, reference_from_array
from tests.audio_samples import encode, speechlike


@pytest.mark.parametrize(
    ("fmt", "subtype", "sample_rate"),
    [
        ("WAV", "PCM_16", 16000),
        ("WAV", "FLOAT", 44100),
        ("FLAC", None, 24000),
        ("OGG", "VORBIS", 48000),
        ("MP3", None, 44100),
    ],
)
def test_decodes_common_formats_to_normalised_24k_mono(fmt, subtype, sample_rate):
    wav = speechlike(6.0, sample_rate)
    ref = decode_reference_audio(encode(np.stack([wav, 0.5 * wav], axis=1), sample_rate, fmt, subtype))
    assert ref.wav_24k.dtype == np.float32
    assert ref.wav_24k.ndim == 1
    assert abs(ref.duration_s - 6.0) < 0.06  # mp3 adds encoder padding
    loudness = pyloudnorm.Meter(24000).integrated_loudness(ref.wav_24k)
    assert abs(loudness - (-27.0)) < 0.05


def test_same_audio_same_id_other_audio_other_id():
    data = encode(speechlike(6.0, 24000, seed=1), 24000)
    assert decode_reference_audio(data).id == decode_reference_audio(data).id
    assert (
        decode_reference_audio(data).id
        != decode_reference_audio(encode(speechlike(6.0, 24000, seed=2), 24000)).id
    )


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: b"", InvalidAudioError, "reference audio is empty"),
        (
            lambda: b"definitely not audio" * 100,
            InvalidAudioError,
            "could not be decoded as wav, flac, ogg or mp3",
        ),
        (
            lambda: encode(speechlike(4.9, 16000), 16000),
            VoiceTooShortError,
            "4.90 s long; a voice needs more than 5 s",
        ),
        (lambda: encode(np.zeros(24000 * 6, np.float32), 24000), SilentAudioError, "silent"),
        (lambda: encode(speechlike(8.0, 24000), 24000), AudioTooLongError, "8.0 s; at most 7 s"),
    ],
)
def test_rejections_name_the_problem(make, error, message):
    with pytest.raises(error, match=message) as info:
        decode_reference_audio(make(), max_seconds=7)
    assert info.value.field == "reference_audio"
    assert isinstance(info.value, TTSInputError)


def test_nonfinite_array_is_rejected():
    wav = speechlike(6.0, 24000)
    wav[100] = np.nan
    with pytest.raises(NonFiniteAudioError, match="NaN or infinite"):
        reference_from_array(wav, 24000)


def _conditionals() -> VoiceConditionals:
    g = torch.Generator().manual_seed(0)
    return VoiceConditionals(
        speaker_emb=torch.rand(64, generator=g),
        t3_prompt_tokens=torch.randint(0, 6561, (120,), generator=g),
        prompt_tokens=torch.randint(0, 6561, (100,), generator=g),
        prompt_feat=torch.randn(201, 80, generator=g),
        embedding=torch.randn(192, generator=g),
    )


def test_voice_round_trips_through_bytes():
    voice = Voice("abc123", _conditionals())
    again = Voice.from_bytes(voice.to_bytes())
    assert again.id == "abc123"
    for name in ("speaker_emb", "t3_prompt_tokens", "prompt_tokens", "prompt_feat", "embedding"):
        assert torch.equal(getattr(again.conditionals, name), getattr(voice.conditionals, name))


@pytest.mark.parametrize("blob", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"garbage" * 10])
def test_voice_from_bytes_rejects_garbage(blob):
    with pytest.raises(TTSInputError, match="serialised voice"):
        Voice.from_bytes(blob)


def test_builtin_voice_loads_from_conds(tiny_checkpoint: Path):
    voice = Voice.from_builtin(tiny_checkpoint / "conds.pt")
    assert voice.id.startswith("builtin-")
    assert voice.conditionals.prompt_feat.shape == (200, 80)
    assert voice.conditionals.t3_prompt_tokens.shape == (100,)
    assert voice.conditionals.speaker_emb.shape == (64,)
