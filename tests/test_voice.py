"""Reference audio decoding and validation, and voice serialisation."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch

from chatterbox.errors import (
    AudioTooLongError,
    InvalidAudioError,
    NonFiniteAudioError,
    SilentAudioError,
    TTSInputError,
    VoiceTooShortError,
)
from chatterbox.voice import Voice, VoiceConditionals, decode_reference_audio, reference_from_array
from tests.audio_samples import encode, speechlike
from tests.flac_bomb import flac_bomb


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


def _unknown_length(flac: bytes) -> bytes:
    """The same FLAC file with STREAMINFO's sample count set to 0, "unknown", as streams write it."""
    info = int.from_bytes(flac[18:26], "big")  # rate, channels, bits, then 36 bits of sample count
    return flac[:18] + (info & ~((1 << 36) - 1)).to_bytes(8, "big") + flac[26:]


def test_flac_of_unknown_length_decodes_to_the_same_reference():
    flac = encode(np.stack([speechlike(6.0, 48000), speechlike(6.0, 48000, seed=3)], axis=1), 48000, "FLAC")
    assert sf.info(io.BytesIO(_unknown_length(flac))).frames == 2**63 - 1  # libsndfile: "unknown"
    known, unknown = decode_reference_audio(flac), decode_reference_audio(_unknown_length(flac))
    assert unknown.id == known.id
    with pytest.raises(AudioTooLongError, match=r"longer than 5\.5 s"):
        decode_reference_audio(_unknown_length(flac), max_seconds=5.5)


@pytest.mark.parametrize(
    ("fmt", "sample_rate", "channels"), [("MP3", 22050, 1), ("OGG", 16000, 2), ("FLAC", 192000, 8)]
)
def test_block_decoding_gives_the_samples_of_a_whole_file_read(fmt, sample_rate, channels):
    data = encode(
        np.stack([speechlike(6.0, sample_rate, seed=i) for i in range(channels)], axis=1), sample_rate, fmt
    )
    whole, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # as upstream's librosa.load reads
    assert decode_reference_audio(data).id == reference_from_array(whole, sample_rate).id


@pytest.mark.parametrize(
    ("channels", "sample_rate", "message"),
    [(9, 16000, "9 channels; at most 8"), (1, 4000, "4000 Hz; 8000 to 192000 Hz"), (1, 384000, "384000 Hz")],
)
def test_header_outside_sane_bounds_is_refused_before_decoding(channels, sample_rate, message):
    data = encode(np.zeros((sample_rate * 6, channels), np.float32), sample_rate, "WAV", "PCM_16")
    with pytest.raises(InvalidAudioError, match=message):
        decode_reference_audio(data)


@pytest.mark.parametrize(
    ("declared", "message"),
    [(None, r"is 96731\.7 s; at most 60 s"), (0, "longer than 60 s")],
    ids=["header-tells", "header-unknown"],
)
def test_flac_bomb_is_refused_within_the_limits_memory(declared, message, tmp_path):
    # 10 MB of 8-channel 192 kHz FLAC that decodes to ~27 hours (~600 GB of float32), decoded in a
    # fresh process so that its peak RSS is this decode's alone.
    bomb = tmp_path / "bomb.flac"
    bomb.write_bytes(flac_bomb(10 * 1024 * 1024, declared_samples=declared))
    result = subprocess.run(
        [sys.executable, "-c", _DECODE_PEAK_RSS, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout)
    assert outcome["code"] == "audio_too_long"
    assert re.search(message, outcome["message"])
    assert outcome["rss_growth_mb"] < 200  # at most 60 s of mono float32 at 192 kHz: 44 MB
    # Header-tells is refused before decoding; header-unknown decodes up to the 60 s limit
    # (92M samples, ~0.5 s on an idle core), given slack for a loaded CI machine.
    assert outcome["seconds"] < (1.0 if declared is None else 3.0)


REPO_ROOT = Path(__file__).resolve().parents[1]
# Decodes argv[1] with the production limit (60 s) after a warm-up; prints the refusal, the time it
# took and how far the peak RSS grew. Address space is capped 2 GB above the warm process's, so a
# decoder that reads the whole bomb fails with MemoryError instead of exhausting the machine.
_DECODE_PEAK_RSS = """
import json, resource, sys, time
from chatterbox.errors import TTSInputError
from chatterbox.voice import decode_reference_audio
from tests.audio_samples import encode, speechlike

decode_reference_audio(encode(speechlike(6.0, 48000), 48000, "FLAC"))
data = open(sys.argv[1], "rb").read()
with open("/proc/self/status") as status:
    vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, ((vm_kb + 2 * 1024 * 1024) * 1024, resource.RLIM_INFINITY))
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    decode_reference_audio(data)
    code, message = None, None
except TTSInputError as error:
    code, message = error.code, str(error)
seconds = time.perf_counter() - start
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb) / 1024
print(json.dumps({"code": code, "message": message, "seconds": seconds, "rss_growth_mb": growth_mb}))
"""
