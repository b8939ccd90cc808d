"""Text front end: upstream's normalisation rules and our tokenizer built from the checkpoint files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatterbox.constants import PARALINGUISTIC_TAGS
from chatterbox.text import EMPTY_TEXT_FALLBACK, TextTokenizer, normalize_text
from chatterbox.weights import CheckpointError
from tests.text_samples import TEXTS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", EMPTY_TEXT_FALLBACK),
        ("hello world", "Hello world."),
        ("  hello", "hello."),  # leading space: the first character is not lowercase, so no capital
        ("Wait… what: now", "Wait,  what, now."),  # replacements come after whitespace collapsing
        ("A — b – c", "A - b - c."),
        ("“Hi” ‘there’", "\"Hi\" 'there'."),
        ("Ends with comma,", "Ends with comma,"),
        ("Question?", "Question?"),
        ("Hi ,there", "Hi,there."),
        ("tabs\tand\nnewlines   ", "Tabs and newlines."),
    ],
)
def test_normalize_text_follows_upstream_rules(raw: str, expected: str):
    assert normalize_text(raw) == expected


def test_tokenizer_round_trips_and_keeps_tags_whole(tiny_checkpoint: Path):
    tokenizer = TextTokenizer.from_dir(tiny_checkpoint)
    added = json.loads((tiny_checkpoint / "added_tokens.json").read_text())
    assert tokenizer.vocab_size == len(json.loads((tiny_checkpoint / "vocab.json").read_text())) + len(added)
    assert tokenizer.max_length == 1024
    for tag in PARALINGUISTIC_TAGS:
        assert tokenizer.encode(f"Well {tag} ok.").count(added[tag]) == 1
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_requires_its_files(tmp_path: Path):
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        TextTokenizer.from_dir(tmp_path)
