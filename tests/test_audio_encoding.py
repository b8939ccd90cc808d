"""Stitching and encoding of the Serve stitcher (pure; no Ray, no model)."""

import io

import numpy as np
import pytest
import soundfile as sf

from serve_app.synthesis.audio import chunk_starts, encode_audio, ms_to_samples, stitch, to_pcm16

SR = 24_000


def noise(n: int, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_length_is_chunks_plus_pauses_minus_crossfades():
    lengths, pauses, crossfade = [4800, 7200, 3000, 9600], [0, 1920, 14400], 240
    chunks = [noise(n, i) for i, n in enumerate(lengths)]
    out = stitch(chunks, pauses, crossfade)
    assert out.dtype == np.float32
    assert len(out) == sum(lengths) + sum(pauses) - 3 * crossfade
    starts, total = chunk_starts(lengths, pauses, crossfade)
    assert total == len(out)
    assert starts == [0, 4800 - 240, 4560 + 7200 + 1920 - 240, 13440 + 3000 + 14400 - 240]


def test_crossfade_without_pause_mixes_complementary_ramps():
    a, b = noise(1000, 1), noise(1000, 2)
    out = stitch([a, b], [0], crossfade=100)
    np.testing.assert_array_equal(out[:900], a[:900])
    np.testing.assert_array_equal(out[1000:], b[100:])
    ramp = (np.arange(100) + 0.5) / 100
    np.testing.assert_allclose(out[900:1000], a[900:] * (1 - ramp) + b[:100] * ramp, atol=1e-6)
    # a constant signal stays constant through a crossfade
    flat = stitch([np.ones(500, np.float32), np.ones(500, np.float32)], [0], crossfade=100)
    np.testing.assert_allclose(flat, 1.0, atol=1e-6)


def test_pause_is_silence_between_faded_chunks():
    a, b = noise(1000, 1), noise(1000, 2)
    out = stitch([a, b], [500], crossfade=100)
    assert len(out) == 2400
    np.testing.assert_array_equal(out[:900], a[:900])
    assert np.all(np.abs(out[900:1000]) <= np.abs(a[900:]))  # fading out
    np.testing.assert_array_equal(out[1000:1400], 0.0)
    np.testing.assert_array_equal(out[1500:], b[100:])


def test_crossfade_shrinks_to_short_chunks():
    lengths = [50, 1000]
    out = stitch([noise(n, i) for i, n in enumerate(lengths)], [0], crossfade=240)
    assert len(out) == 1000  # overlap limited to the 50-sample chunk
    assert stitch([noise(300, 0)], [], crossfade=240).shape == (300,)


def test_stitch_rejects_bad_plans():
    with pytest.raises(ValueError, match="need 1 pauses for 2 chunks"):
        stitch([noise(10, 0), noise(10, 1)], [], 5)
    with pytest.raises(ValueError, match="at least one chunk"):
        stitch([], [], 5)
    with pytest.raises(ValueError, match="non-negative"):
        stitch([noise(10, 0), noise(10, 1)], [-1], 5)


def test_ms_to_samples():
    assert ms_to_samples(10, SR) == 240
    assert ms_to_samples(600, SR) == 14_400
    assert ms_to_samples(0, SR) == 0


def test_pcm16_clips_and_scales_like_libsndfile():
    wav = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 0.5, 1.0, 2.0], np.float32)
    assert to_pcm16(wav).tolist() == [-32768, -32768, -16384, 0, 9830, 16384, 32767, 32767]


@pytest.mark.parametrize("audio_format", ["wav", "flac"])
def test_lossless_formats_hold_exact_pcm16(audio_format):
    wav = noise(SR, 3)
    data = encode_audio(wav, SR, audio_format)
    assert data[:4] == (b"RIFF" if audio_format == "wav" else b"fLaC")
    decoded, sample_rate = sf.read(io.BytesIO(data), dtype="int16")
    assert sample_rate == SR
    np.testing.assert_array_equal(decoded, to_pcm16(wav))


def test_raw_pcm_is_little_endian_int16():
    wav = noise(1234, 4)
    data = encode_audio(wav, SR, "pcm")
    assert len(data) == 2 * 1234
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), to_pcm16(wav))
    wav_bytes = encode_audio(wav, SR, "wav")
    assert wav_bytes.endswith(data)  # the WAV data chunk is exactly the raw PCM


@pytest.mark.parametrize(("audio_format", "magic"), [("opus", b"OggS"), ("mp3", None)])
def test_lossy_formats_decode_to_the_same_duration(audio_format, magic):
    t = np.arange(2 * SR) / SR
    wav = (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    data = encode_audio(wav, SR, audio_format)
    if magic:
        assert data.startswith(magic)
    decoded, sample_rate = sf.read(io.BytesIO(data), dtype="float32")
    assert sample_rate == SR
    assert abs(len(decoded) - len(wav)) < 0.05 * SR
    assert len(data) < len(wav)  # compressed well below 2 bytes per sample
    rms = float(np.sqrt(np.mean(decoded**2)))
    assert rms == pytest.approx(0.4 / np.sqrt(2), rel=0.15)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="mono"):
        encode_audio(np.zeros((2, 10), np.float32), SR, "wav")
    with pytest.raises(ValueError, match="unknown audio format 'aac'"):
        encode_audio(np.zeros(10, np.float32), SR, "aac")
