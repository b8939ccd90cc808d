"""Captions from the stitch plan (pure, no Ray): exact chunk boundaries, character-apportioned cues,
wrapped lines, and SRT/WebVTT that their parsers read back."""

from __future__ import annotations

import html
import io
import itertools

import pytest
import srt
import webvtt

from serve_app.schemas import ChunkInfo
from serve_app.synthesis.captions import MAX_LINE_CHARS, captions, segments, to_srt, to_vtt, wrap_lines

SR = 24_000
CHUNKS = [
    ChunkInfo(text="Hello there. " * 10 + "The end of the first chunk.", start_sample=0, num_samples=5 * SR),
    ChunkInfo(text="Short <second> & last.", start_sample=5 * SR + 1200, num_samples=SR),
]


def test_lines_are_wrapped_at_spaces_within_the_limit():
    text = "word " * 40 + "supercalifragilisticexpialidocious" * 2
    lines = wrap_lines(text)
    assert " ".join(lines) == " ".join(text.split())
    assert all(len(line) <= MAX_LINE_CHARS for line in lines[:-1])
    assert lines[-1] == "supercalifragilisticexpialidocious" * 2  # a longer word stands alone


def test_cues_keep_chunk_boundaries_exact_and_share_time_by_characters():
    cues = segments(CHUNKS, SR)
    first = [c for c in cues if c.end <= 5.0 + 1e-9]
    assert first[0].start == 0.0
    assert first[-1].end == pytest.approx(5.0)
    second = cues[len(first) :]
    assert second[0].start == pytest.approx(5.05)  # the chunk's start sample, 5 s + 1200 samples
    assert second[-1].end == pytest.approx(6.05)
    for cue in cues:
        assert len(cue.text.split("\n")) <= 2
    # Within a chunk: each cue's share of the time is its share of the characters.
    total_chars = sum(len(c.text.replace("\n", " ")) for c in first)
    for cue in first:
        assert cue.end - cue.start == pytest.approx(5.0 * len(cue.text.replace("\n", " ")) / total_chars)
    for a, b in itertools.pairwise(cues):
        assert a.end <= b.start + 1e-9


def test_srt_and_vtt_parse_back_to_the_segments():
    cues = segments(CHUNKS, SR)
    parsed = list(srt.parse(to_srt(cues)))
    assert [p.content for p in parsed] == [c.text for c in cues]
    assert [p.start.total_seconds() for p in parsed] == [pytest.approx(c.start, abs=1e-3) for c in cues]
    assert [p.end.total_seconds() for p in parsed] == [pytest.approx(c.end, abs=1e-3) for c in cues]

    vtt = webvtt.from_buffer(io.StringIO(to_vtt(cues)))
    # WebVTT's text is markup: webvtt-py keeps the character references, which unescape to the text.
    assert vtt.captions[-1].text == "Short &lt;second&gt; &amp; last."
    assert [html.unescape(cue.text) for cue in vtt] == [c.text for c in cues]
    assert [cue.start_in_seconds for cue in vtt] == [int(c.start) for c in cues]


def test_json_captions_are_the_segments():
    out = captions(CHUNKS, SR, "json")
    assert out == [{"text": c.text, "start": c.start, "end": c.end} for c in segments(CHUNKS, SR)]
