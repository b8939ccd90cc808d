"""Reference audio: decoding and validating a voice's reference clip.

A reference clip (5 s or more) is decoded to mono 24 kHz and loudness-normalised to -27 LUFS, as
upstream does, on CPU and without the model (the Serve ingress does this once per request).
Model replicas then turn it into a ``Voice`` (``chatterbox.voice.conditioning``).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import soundfile as sf

from chatterbox.constants import MAX_REFERENCE_SECONDS, MIN_REFERENCE_SECONDS, S3GEN_SR
from chatterbox.errors import (
    AudioTooLongError,
    InvalidAudioError,
    NonFiniteAudioError,
    SilentAudioError,
    VoiceTooShortError,
)

REFERENCE_LUFS = -27.0
SILENCE_PEAK = 10 ** (-60 / 20)  # a clip whose loudest sample is below -60 dBFS carries no voice
# What a reference file may be, checked from its header before decoding (see decode_reference_audio).
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8
_SF_UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's SF_COUNT_MAX: "length unknown"
_DECODE_BLOCK_FRAMES = 262_144


@dataclass(frozen=True)
class ReferenceAudio:
    """A validated reference clip: mono float32 at 24 kHz, loudness-normalised."""

    wav_24k: np.ndarray
    id: str  # sha256 of the samples: equal audio, equal id

    @property
    def duration_s(self) -> float:
        return len(self.wav_24k) / S3GEN_SR


def normalize_loudness(wav: np.ndarray, sample_rate: int, target_lufs: float = REFERENCE_LUFS) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness (BS.1770); unchanged where that is undefined."""
    import pyloudnorm  # here, not at the top: the GPU suite runs the model without the audio packages

    try:
        loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(wav)
    except ValueError:  # shorter than one 0.4 s gating block
        return wav
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    if math.isfinite(gain) and gain > 0.0:
        return wav * np.float32(gain)  # float32 arithmetic, as upstream (numpy 1.x) computes it
    return wav


def reference_from_array(
    wav: np.ndarray, sample_rate: int, max_seconds: float | None = None, field: str = "reference_audio"
) -> ReferenceAudio:
    """Validate, downmix, resample to 24 kHz and normalise an in-memory clip."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:  # (samples, channels), as soundfile returns
        wav = wav.mean(axis=1)
    if wav.ndim != 1 or wav.size == 0:
        raise InvalidAudioError(
            f"reference audio must be a non-empty mono or (samples, channels) array, got shape {wav.shape}",
            field,
        )
    if sample_rate <= 0:
        raise InvalidAudioError(f"sample rate must be positive, got {sample_rate}", field)
    if not np.isfinite(wav).all():
        raise NonFiniteAudioError("reference audio contains NaN or infinite samples", field)
    if max_seconds is not None and wav.size / sample_rate > max_seconds:
        raise _too_long(wav.size / sample_rate, max_seconds, field)
    if sample_rate != S3GEN_SR:
        import librosa  # here for the reason in normalize_loudness

        wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=S3GEN_SR, res_type="soxr_hq")
    seconds = wav.size / S3GEN_SR
    if seconds <= MIN_REFERENCE_SECONDS:
        raise VoiceTooShortError(
            f"reference audio is {seconds:.2f} s long; a voice needs more than {MIN_REFERENCE_SECONDS:g} s",
            field,
        )
    if float(np.abs(wav).max()) < SILENCE_PEAK:
        raise SilentAudioError("reference audio is silent (peak below -60 dBFS)", field)
    wav = np.ascontiguousarray(normalize_loudness(wav, S3GEN_SR), dtype=np.float32)
    return ReferenceAudio(wav_24k=wav, id=hashlib.sha256(wav.tobytes()).hexdigest())


def decode_reference_audio(
    data: bytes, max_seconds: float = MAX_REFERENCE_SECONDS, field: str = "reference_audio"
) -> ReferenceAudio:
    """Decode a wav/flac/ogg/mp3 file's bytes into a validated ``ReferenceAudio``.

    A few KB of FLAC can hold hours of 8-channel audio, so the header is checked before anything is
    decoded, and the decoding itself stops once it passes ``max_seconds``: time and memory are
    bounded by the limit (a mono float32 buffer of ``max_seconds``), never by what the file claims.
    """
    import soundfile as sf  # here for the reason in normalize_loudness

    if not data:
        raise InvalidAudioError("reference audio is empty", field)
    try:
        audio = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudioError(
            f"reference audio could not be decoded as wav, flac, ogg or mp3 ({exc})", field
        ) from exc
    with audio:
        if not MIN_SAMPLE_RATE <= audio.samplerate <= MAX_SAMPLE_RATE:
            raise InvalidAudioError(
                f"reference audio is sampled at {audio.samplerate} Hz; "
                f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz is accepted",
                field,
            )
        if audio.channels > MAX_CHANNELS:
            raise InvalidAudioError(
                f"reference audio has {audio.channels} channels; at most {MAX_CHANNELS} are accepted", field
            )
        max_frames = math.floor(max_seconds * audio.samplerate)
        # Formats that do not know their length (FLAC may say so, streams) report SF_COUNT_MAX.
        if _SF_UNKNOWN_FRAMES > audio.frames > max_frames:
            raise _too_long(audio.frames / audio.samplerate, max_seconds, field)
        wav = _decode_mono(audio, max_frames, field)
        if len(wav) > max_frames:
            raise AudioTooLongError(
                f"reference audio is longer than {max_seconds:g} s, the most that is accepted", field
            )
        return reference_from_array(wav, audio.samplerate, field=field)


def _decode_mono(audio: sf.SoundFile, max_frames: int, field: str) -> np.ndarray:
    """At most ``max_frames + 1`` frames, downmixed block by block (one more than the limit says
    the file is too long, without decoding the rest)."""
    import soundfile as sf

    # np.empty reserves address space only: memory grows with the frames actually decoded.
    wav = np.empty(max_frames + 1, dtype=np.float32)
    block = np.empty((_DECODE_BLOCK_FRAMES, audio.channels), dtype=np.float32)
    # Start from a seek to 0, as SoundFile.read (so upstream's librosa.load) does: libsndfile's mp3
    # decoder restarts there, and without it some mp3 samples come out an ulp apart.
    try:
        audio.seek(0)
    except sf.LibsndfileError as exc:
        raise InvalidAudioError(f"reference audio is corrupt ({exc})", field) from exc
    decoded = 0
    while decoded < len(wav):
        wanted = min(len(block), len(wav) - decoded)
        got = _read_into(audio, block[:wanted], field)
        # The same per-row mean as downmixing the whole clip at once, so the samples are equal.
        np.mean(block[:got], axis=1, out=wav[decoded : decoded + got])
        decoded += got
        if got < wanted:
            break
    return wav[:decoded]


def _read_into(audio: sf.SoundFile, out: np.ndarray, field: str) -> int:
    """Decode the next ``len(out)`` frames into ``out`` (C-contiguous float32, frames x channels);
    returns the number of frames read, fewer at the end of the file.

    libsndfile's own read call: ``SoundFile.read`` seeks after every read to track its position, and
    libsndfile cannot seek to the end of a FLAC stream that does not state its length (as piped
    encoders write it), so the last read of such a file would fail.
    """
    import soundfile as sf

    got = sf._snd.sf_readf_float(audio._file, sf._ffi.cast("float *", out.ctypes.data), len(out))
    if sf._snd.sf_error(audio._file):
        message = sf._ffi.string(sf._snd.sf_strerror(audio._file)).decode("utf-8", "replace")
        raise InvalidAudioError(f"reference audio is corrupt ({message})", field)
    return got


def _too_long(seconds: float, max_seconds: float, field: str) -> AudioTooLongError:
    return AudioTooLongError(
        f"reference audio is {seconds:.1f} s; at most {max_seconds:g} s is accepted", field
    )
