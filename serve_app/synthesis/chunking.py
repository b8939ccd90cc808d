"""Split long text into model-sized chunks: paragraphs, then sentences, then clauses, then words.

Pure functions; no Ray, no model. A chunk fits when it has at most `max_chars` characters and, given
the model's `max_text_tokens`, its text as the engine normalises it has at most `max_text_tokens`
UTF-8 bytes: GPT-2's byte-level BPE never spends more than one token per byte (added `[tag]` tokens
cover several). Normalisation may append a "." and capitalise the first letter, which can grow it
by several bytes ("ΐ" -> "Ϊ́"), so the bound measures the normalised text. The ingress thus respects
the model's limit without a tokenizer or a round trip to a replica.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from chatterbox.text import normalize_text
from serve_app.config import MAX_TAG_CHARS

BreakKind = Literal["paragraph", "sentence", "clause"]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_WHITESPACE = re.compile(r"\s+")
_TAG = re.compile(rf"\[[^\[\]\n]{{1,{MAX_TAG_CHARS - 2}}}\]")
# A sentence ends with . ! ? or … (optionally closed by quotes or a bracket) before a space.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)]*(?= )")
_CLAUSE_END = re.compile(r"(?:[,;:—–]|(?<= )-)(?= )")
# "Dr. Smith" and "e.g. this" do not end sentences; neither does a single initial ("J. Smith").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "etc"})
_LEVEL_BREAK: dict[int, BreakKind] = {0: "sentence"}  # deeper levels (clause, word, character) -> "clause"


@dataclass(frozen=True)
class TextChunk:
    """One model call's text and what kind of break follows it (decides the pause)."""

    text: str
    break_after: BreakKind


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs (split at blank lines), whitespace collapsed to single spaces, empty ones dropped."""
    paragraphs = (_WHITESPACE.sub(" ", p).strip() for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p]


def chunk_fits(text: str, max_chars: int, max_text_tokens: int | None) -> bool:
    """True when `text` is short enough in characters and (an upper bound of) model tokens."""
    if len(text) > max_chars:
        return False
    return max_text_tokens is None or len(normalize_text(text).encode("utf-8")) <= max_text_tokens


def split_text(text: str, max_chars: int, max_text_tokens: int | None = None) -> list[TextChunk]:
    """Chunks in reading order; the last chunk of every paragraph has `break_after="paragraph"`.

    Sentences are packed greedily up to the limit; a sentence that does not fit alone is split at
    clauses, a clause at words, a word at characters. A `[tag]` is never cut. Joining the chunks of
    a paragraph with single spaces gives the paragraph back unless a single word had to be cut.
    """
    if max_chars <= MAX_TAG_CHARS:
        raise ValueError(f"max_chars must exceed {MAX_TAG_CHARS} (the longest [tag]), got {max_chars}")

    def fits(piece: str) -> bool:
        return chunk_fits(piece, max_chars, max_text_tokens)

    chunks: list[TextChunk] = []
    for paragraph in split_paragraphs(text):
        pieces, levels = _split(paragraph, fits, level=0)
        chunks += [
            TextChunk(p, _LEVEL_BREAK.get(lv, "clause")) for p, lv in zip(pieces[:-1], levels, strict=True)
        ]
        chunks.append(TextChunk(pieces[-1], "paragraph"))
    return chunks


def _tag_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _TAG.finditer(text)]


def _inside_tag(index: int, spans: list[tuple[int, int]]) -> bool:
    return any(start < index < end for start, end in spans)


def _sentence_breaks(text: str) -> list[int]:
    """Indices of the spaces that end sentences."""
    breaks = []
    for m in _SENTENCE_END.finditer(text):
        word = text[: m.start()].rsplit(" ", 1)[-1]
        is_abbreviation = m.group().startswith(".") and (
            word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())
        )
        if not is_abbreviation:
            breaks.append(m.end())
    return breaks


def _clause_breaks(text: str) -> list[int]:
    return [m.end() for m in _CLAUSE_END.finditer(text)]


def _word_breaks(text: str) -> list[int]:
    return [i for i, c in enumerate(text) if c == " "]


_BREAKS: tuple[Callable[[str], list[int]], ...] = (_sentence_breaks, _clause_breaks, _word_breaks)


def _split_at_spaces(text: str, breaks: list[int]) -> list[str]:
    """Cut at the given space indices (spaces inside a [tag] are skipped); the spaces are dropped."""
    spans = _tag_spans(text)
    parts, start = [], 0
    for i in breaks:
        if not _inside_tag(i, spans) and i > start:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _split(text: str, fits: Callable[[str], bool], level: int) -> tuple[list[str], list[int]]:
    """Pieces of `text` that each fit, and the level of the break after every piece but the last."""
    if fits(text):
        return [text], []
    if level == len(_BREAKS):
        pieces = _cut_word(text, fits)
        return pieces, [level] * (len(pieces) - 1)
    parts = _split_at_spaces(text, _BREAKS[level](text))
    if len(parts) == 1:
        return _split(text, fits, level + 1)
    pieces: list[str] = []
    levels: list[int] = []
    current = ""  # the chunk being packed; parts are never empty
    for part in parts:
        if current and fits(f"{current} {part}"):
            current = f"{current} {part}"
            continue
        if current:
            pieces.append(current)
            levels.append(level)
        if fits(part):
            current = part
        else:  # split the part finer; its last piece may still share a chunk with the next part
            sub_pieces, sub_levels = _split(part, fits, level + 1)
            pieces += sub_pieces[:-1]
            levels += sub_levels
            current = sub_pieces[-1]
    pieces.append(current)
    return pieces, levels


def _cut_word(text: str, fits: Callable[[str], bool]) -> list[str]:
    """Cut one overlong word into the longest prefixes that fit, moving a cut out of a [tag]."""
    pieces = []
    while text:
        low, high = 1, len(text)  # fits() is monotone in the prefix length: binary search
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(text[:mid]) else (low, mid - 1)
        end = low
        for start, stop in _tag_spans(text):
            if start < end < stop and start > 0:
                end = start
        pieces.append(text[:end])
        text = text[end:]
    return pieces
