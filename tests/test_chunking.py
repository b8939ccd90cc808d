"""Text chunking for the Serve ingress (pure; no Ray, no model)."""

import itertools
import re

import pytest

from chatterbox.text import TextTokenizer, normalize_text
from serve_app.synthesis.chunking import TextChunk, chunk_fits, split_paragraphs, split_text

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump?",
    "Sphinx of black quartz, judge my vow.",
]


def long_text(n_chars: int) -> str:
    out, i = [], 0
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(SENTENCES[i % len(SENTENCES)])
        i += 1
    return " ".join(out)


def test_short_text_is_one_chunk():
    assert split_text("  Hello   there.\n", max_chars=300) == [TextChunk("Hello there.", "paragraph")]


def test_empty_and_blank_text_give_no_chunks():
    assert split_text("", max_chars=300) == []
    assert split_text(" \n\n\t \n", max_chars=300) == []


def test_long_text_packs_whole_sentences_up_to_the_limit():
    text = long_text(2000)
    chunks = split_text(text, max_chars=300)
    assert len(chunks) == 8  # 2000 characters of ~42-character sentences, ~7 per chunk
    assert all(len(c.text) <= 300 for c in chunks)
    assert " ".join(c.text for c in chunks) == text
    assert all(c.text.endswith((".", "!", "?")) for c in chunks)
    assert [c.break_after for c in chunks] == ["sentence"] * 7 + ["paragraph"]
    # greedy: adding the next sentence would have overflowed
    for chunk, nxt in itertools.pairwise(chunks):
        first_next = re.split(r"(?<=[.!?]) ", nxt.text)[0]
        assert len(chunk.text) + 1 + len(first_next) > 300


def test_paragraph_breaks_end_chunks():
    text = "First paragraph, one line.\r\nStill the first.\n\n  \nSecond one.\n \nThird."
    chunks = split_text(text, max_chars=300)
    assert chunks == [
        TextChunk("First paragraph, one line. Still the first.", "paragraph"),
        TextChunk("Second one.", "paragraph"),
        TextChunk("Third.", "paragraph"),
    ]
    assert split_paragraphs(text) == [c.text for c in chunks]


def test_long_sentence_splits_at_clauses_then_words():
    clauses = ", ".join(f"clause number {i} goes on for a while" for i in range(12)) + "."
    chunks = split_text(clauses, max_chars=100)
    assert " ".join(c.text for c in chunks) == clauses
    assert all(len(c.text) <= 100 for c in chunks)
    assert all(c.text.endswith(",") for c in chunks[:-1])
    assert {c.break_after for c in chunks[:-1]} == {"clause"}

    words = " ".join(["word"] * 80)  # 399 characters, no punctuation
    chunks = split_text(words, max_chars=100)
    assert [len(c.text) for c in chunks] == [99, 99, 99, 99]
    assert " ".join(c.text for c in chunks) == words


def test_sentence_breaks_beat_clause_breaks():
    text = "A short one. " + ", ".join(["then a clause"] * 10) + "."
    chunks = split_text(text, max_chars=120)
    assert chunks[0] == TextChunk("A short one.", "sentence")


@pytest.mark.parametrize("opening", ["Dr.", "Mr.", "J.", "e.g."])
def test_abbreviations_and_initials_do_not_end_sentences(opening):
    # Were the opening a sentence, it would be a chunk of its own; it stays with its sentence.
    text = f"{opening} Anderson " + "walked " * 12 + "home. Then he slept."
    chunks = split_text(text, max_chars=70)
    assert chunks[0].text.startswith(f"{opening} Anderson walked")
    assert chunks[-1].text.endswith("home. Then he slept.")


def test_tags_are_never_cut():
    # A plain word split would cut at the space inside "[clear throat]" (the chunk would be 67 chars).
    text = "a" * 60 + " [clear throat] " + "b" * 20
    chunks = split_text(text, max_chars=70)
    assert [c.text for c in chunks] == ["a" * 60, "[clear throat] " + "b" * 20]

    glued = "a" * 60 + "[clear throat]" + "b" * 60  # one 134-character word
    chunks = split_text(glued, max_chars=70)
    assert "".join(c.text for c in chunks) == glued
    assert chunks[1].text.startswith("[clear throat]")
    assert all(len(c.text) <= 70 for c in chunks)


def test_overlong_word_is_cut_to_the_limit():
    word = "x" * 250
    chunks = split_text(f"Start. {word} end.", max_chars=100)
    assert [c.text for c in chunks] == ["Start.", "x" * 100, "x" * 100, "x" * 50 + " end."]


def test_token_bound_counts_utf8_bytes():
    # "é" is two UTF-8 bytes: a 300-token model fits 149 of them (+1 for an appended period).
    assert chunk_fits("é" * 149, max_chars=1000, max_text_tokens=300)
    assert not chunk_fits("é" * 150, max_chars=1000, max_text_tokens=300)
    text = " ".join(["héllo wörld ünïcode"] * 40)
    chunks = split_text(text, max_chars=1000, max_text_tokens=100)
    assert all(len(c.text.encode()) + 1 <= 100 for c in chunks)
    assert " ".join(c.text for c in chunks) == text


def test_limit_must_exceed_the_longest_tag():
    with pytest.raises(ValueError, match="max_chars must exceed 64"):
        split_text("Hello.", max_chars=64)


def test_no_chunk_exceeds_the_model_token_limit(tiny_checkpoint):
    # Capitalising "ΐ" gives "Ϊ́" (2 -> 6 bytes) and a "." is appended: 1022 bytes of text become 1027
    # tokens in the engine. Counting raw bytes let this through as one chunk; the engine refused it.
    tokenizer = TextTokenizer.from_dir(tiny_checkpoint)
    text = "ΐ" + "😀" * 255 + " " + long_text(600) + " ΐ" + "é" * 200
    chunks = split_text(text, max_chars=300, max_text_tokens=tokenizer.max_length)
    assert chunks[0].text == "ΐ" + "😀" * 254
    token_counts = [len(tokenizer.encode(normalize_text(c.text))) for c in chunks]
    assert max(token_counts) <= tokenizer.max_length == 1024
    assert token_counts[0] == 1023
