"""Captions of stitched audio: segments (text, start, end in seconds) from where the stitch plan
put each chunk, as JSON, SRT or WebVTT. Pure functions; no Ray, no model.

A chunk's start and length in the joined audio are exact (`chunk_starts` of the stitch plan). Within
a chunk the model gives no timing, so its text is cut into cues of at most `max_lines` lines of
`max_line_chars` characters (at spaces; a longer word stands alone) and the chunk's time is
apportioned among its cues by characters: a cue of a third of the chunk's characters gets a third
of its time. Cues never cross a chunk boundary, so errors do not accumulate over a long script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from serve_app.schemas import ChunkInfo

CaptionFormat = Literal["srt", "vtt", "json"]
CAPTION_MEDIA_TYPES: dict[str, str] = {
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "json": "application/json",
}
MAX_LINE_CHARS = 42  # the usual subtitle line (BBC, Netflix guidelines)
MAX_LINES = 2


@dataclass(frozen=True)
class Segment:
    text: str  # lines joined by "\n"
    start: float  # seconds in the joined audio
    end: float


def wrap_lines(text: str, max_line_chars: int = MAX_LINE_CHARS) -> list[str]:
    """`text` in lines of at most `max_line_chars` characters, cut at spaces."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= max_line_chars:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def segments(
    chunks: Sequence[ChunkInfo],
    sample_rate: int,
    max_line_chars: int = MAX_LINE_CHARS,
    max_lines: int = MAX_LINES,
) -> list[Segment]:
    """Cues of every chunk, in order, timed as the module docstring says."""
    out: list[Segment] = []
    for chunk in chunks:
        lines = wrap_lines(chunk.text, max_line_chars)
        cues = [lines[i : i + max_lines] for i in range(0, len(lines), max_lines)]
        weights = [sum(len(line) for line in cue) + len(cue) - 1 for cue in cues]
        total = sum(weights)
        start = chunk.start_sample / sample_rate
        duration = chunk.num_samples / sample_rate
        done = 0
        for cue, weight in zip(cues, weights, strict=True):
            begin = start + duration * done / total
            done += weight
            out.append(Segment("\n".join(cue), begin, start + duration * done / total))
    return out


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_srt(cues: Sequence[Segment]) -> str:
    return "".join(
        f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n\n"
        for i, c in enumerate(cues, 1)
    )


def to_vtt(cues: Sequence[Segment]) -> str:
    # WebVTT cue text is markup: "&", "<" and ">" (so also "-->") are written as character references.
    body = "".join(
        f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{_vtt_text(c.text)}\n\n" for c in cues
    )
    return f"WEBVTT\n\n{body}"


def _vtt_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_json(cues: Sequence[Segment]) -> list[dict[str, str | float]]:
    return [{"text": c.text, "start": c.start, "end": c.end} for c in cues]


def captions(
    chunks: Sequence[ChunkInfo], sample_rate: int, caption_format: CaptionFormat
) -> str | list[dict[str, str | float]]:
    """The captions of stitched audio in `caption_format` (SRT/WebVTT text, or JSON segments)."""
    cues = segments(chunks, sample_rate)
    if caption_format == "srt":
        return to_srt(cues)
    if caption_format == "vtt":
        return to_vtt(cues)
    return to_json(cues)
