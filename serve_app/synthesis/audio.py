"""Join chunk audio and encode it. Pure functions on float32 mono arrays; no Ray, no model.

The stitch plan (`stitch_plan`) turns a text's chunks into the pauses and crossfade between them.

Joining: chunk i+1 starts `pause_i - crossfade_i` samples after chunk i ends, where
`crossfade_i = min(crossfade, len(chunk_i), len(chunk_i+1))`. Chunk i's last `crossfade_i` samples
fade out and chunk i+1's first `crossfade_i` fade in (complementary linear ramps), and overlapping
samples add. With no pause that is a plain crossfade; with a pause the chunks fade into and out of
silence. The total length is therefore exactly
`sum(len(chunk)) + sum(pauses) - sum(crossfade_i)`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import soundfile as sf

from serve_app.config import StitchingConfig
from serve_app.synthesis.chunking import TextChunk

AudioFormat = Literal["wav", "flac", "opus", "mp3", "pcm"]  # opus is in an Ogg container
# The media type of each format's bytes. pcm is headerless 16-bit little-endian, as OpenAI's speech
# API labels it; "audio/L16" would claim network (big-endian) byte order.
CONTENT_TYPES: dict[AudioFormat, str] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "mp3": "audio/mpeg",
    "pcm": "audio/pcm",
}
# (libsndfile container, subtype) per format; pcm is written by hand (no header).
_SOUNDFILE_FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


def ms_to_samples(ms: float, sample_rate: int) -> int:
    return round(ms * sample_rate / 1000)


@dataclass(frozen=True)
class StitchPlan:
    """How the stitcher joins the chunk audio it receives (in this order)."""

    chunk_texts: list[str]
    pauses: list[int]  # samples after every chunk but the last
    crossfade: int  # samples
    sample_rate: int
    format: AudioFormat


def stitch_plan(
    chunks: Sequence[TextChunk], stitching: StitchingConfig, sample_rate: int, audio_format: AudioFormat
) -> StitchPlan:
    """The plan of a text's chunks: a pause after each by how it ends (paragraph, sentence, or none
    mid-sentence) and one crossfade, in samples."""
    pause_ms = {"paragraph": stitching.paragraph_pause_ms, "sentence": stitching.sentence_pause_ms}
    return StitchPlan(
        chunk_texts=[c.text for c in chunks],
        pauses=[ms_to_samples(pause_ms.get(c.break_after, 0.0), sample_rate) for c in chunks[:-1]],
        crossfade=ms_to_samples(stitching.crossfade_ms, sample_rate),
        sample_rate=sample_rate,
        format=audio_format,
    )


def chunk_starts(lengths: Sequence[int], pauses: Sequence[int], crossfade: int) -> tuple[list[int], int]:
    """Start sample of every chunk in the joined audio, and the joined length.

    lengths: samples per chunk (n); pauses: samples of pause after every chunk but the last (n - 1).
    """
    if len(pauses) != max(len(lengths) - 1, 0):
        raise ValueError(
            f"need {max(len(lengths) - 1, 0)} pauses for {len(lengths)} chunks, got {len(pauses)}"
        )
    if crossfade < 0 or any(p < 0 for p in pauses):
        raise ValueError("crossfade and pauses must be non-negative")
    starts, end = [], 0
    for i, length in enumerate(lengths):
        if i > 0:
            end += pauses[i - 1] - _overlap(lengths, i - 1, crossfade)
        starts.append(end)
        end += length
    return starts, end


def _overlap(lengths: Sequence[int], i: int, crossfade: int) -> int:
    """Crossfade between chunk i and chunk i + 1, shortened to fit the shorter of the two."""
    return min(crossfade, lengths[i], lengths[i + 1])


def stitch(chunks: Sequence[np.ndarray], pauses: Sequence[int], crossfade: int) -> np.ndarray:
    """Join float32 mono chunks (n >= 1) with pauses and crossfades; (T,) float32."""
    if not chunks:
        raise ValueError("stitch needs at least one chunk")
    lengths = [len(c) for c in chunks]
    starts, total = chunk_starts(lengths, pauses, crossfade)
    out = np.zeros(total, dtype=np.float32)
    for i, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
        wav = np.asarray(chunk, dtype=np.float32).copy()
        if i > 0:
            n = _overlap(lengths, i - 1, crossfade)
            wav[:n] *= _ramp(n)
        if i < len(chunks) - 1:
            n = _overlap(lengths, i, crossfade)
            wav[len(wav) - n :] *= 1.0 - _ramp(n)
        out[start : start + len(wav)] += wav
    return out


def _ramp(n: int) -> np.ndarray:
    """Rising linear ramp of n samples strictly inside (0, 1); with 1 - ramp it sums to one."""
    return ((np.arange(n, dtype=np.float32) + 0.5) / n).astype(np.float32)


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, clipped, scaled by 32768 as libsndfile does."""
    return np.clip(np.rint(np.asarray(wav, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def to_s16le(wav: np.ndarray) -> bytes:
    """Raw PCM: int16 little-endian samples, no header."""
    return to_pcm16(wav).astype("<i2").tobytes()


def encode_audio(wav: np.ndarray, sample_rate: int, audio_format: AudioFormat) -> bytes:
    """Encode mono float32 audio: wav/flac as PCM16, opus in Ogg, mp3 (layer III), pcm as raw s16le."""
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio of shape (T,), got {wav.shape}")
    if audio_format == "pcm":
        return to_s16le(wav)
    if audio_format not in _SOUNDFILE_FORMATS:
        raise ValueError(f"unknown audio format {audio_format!r}; one of {get_args(AudioFormat)}")
    container, subtype = _SOUNDFILE_FORMATS[audio_format]
    # Lossless formats get our exact PCM16 samples; lossy encoders take the float signal.
    data = to_pcm16(wav) if subtype == "PCM_16" else np.clip(wav, -1.0, 1.0).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, data, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


class StreamingStitch:
    """`stitch` for chunks that arrive one by one, in order: `add` returns the joined samples that
    no later chunk can change, so that the concatenation of everything `add` returns equals
    `stitch(chunks, pauses, crossfade)` sample for sample.

    What later chunks can change is the last chunk's final `min(crossfade, len)` samples (their
    fade-out depends on the next chunk's length) and anything after them, so those are held back
    until the next chunk arrives; the last chunk (one more than there are pauses) returns them all.
    Fades and additions happen in the same order as in `stitch`, hence the same float32 results.
    """

    def __init__(self, pauses: Sequence[int], crossfade: int) -> None:
        if crossfade < 0 or any(p < 0 for p in pauses):
            raise ValueError("crossfade and pauses must be non-negative")
        self._pauses = list(pauses)
        self._crossfade = crossfade
        self._added = 0  # chunks added so far
        self._joined = np.zeros(0, dtype=np.float32)  # joined samples from `self._returned` on
        self._returned = 0
        self._previous = np.zeros(0, dtype=np.float32)  # the last chunk added, faded in
        self._previous_end = 0  # where it ends in the joined audio

    def add(self, chunk: np.ndarray) -> np.ndarray:
        """Add the next chunk; the joined samples that are now final, (T,) float32."""
        if self._added > len(self._pauses):
            raise ValueError(f"{len(self._pauses) + 1} chunks expected (one more than the pauses), got more")
        wav = np.asarray(chunk, dtype=np.float32).copy()
        start = 0
        if self._added > 0:
            previous = self._previous
            n = min(self._crossfade, len(previous), len(wav))
            held = self._held(len(previous))
            tail = previous[len(previous) - held :]
            tail[held - n :] *= 1.0 - _ramp(n)
            self._mix(self._previous_end - held, tail)
            start = self._previous_end + self._pauses[self._added - 1] - n
            wav[:n] *= _ramp(n)
        self._added += 1
        last = self._added == len(self._pauses) + 1
        held = 0 if last else self._held(len(wav))
        self._mix(start, wav[: len(wav) - held])
        self._previous, self._previous_end = wav, start + len(wav)
        return self._take(self._previous_end - held)

    def _held(self, length: int) -> int:
        return min(self._crossfade, length)

    def _mix(self, start: int, samples: np.ndarray) -> None:
        """Add `samples` into the joined audio at absolute sample `start` (never before what was returned)."""
        offset = start - self._returned
        missing = offset + len(samples) - len(self._joined)
        if missing > 0:
            self._joined = np.concatenate([self._joined, np.zeros(missing, dtype=np.float32)])
        self._joined[offset : offset + len(samples)] += samples

    def _take(self, end: int) -> np.ndarray:
        """Return the joined samples before absolute sample `end` (`_mix` has reached it)."""
        count = end - self._returned
        out, self._joined = self._joined[:count], self._joined[count:]
        self._returned = end
        return out
