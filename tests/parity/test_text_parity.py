"""Our text normalisation and tokenizer give upstream's ids on the same checkpoint files."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatterbox.text import TextTokenizer, normalize_text
from reference.oracle import run_reference
from tests.text_samples import TEXTS

pytestmark = pytest.mark.parity


def test_normalisation_and_ids_equal_upstream(tiny_checkpoint: Path):
    # The tokenizer files are the same at both sizes; the tiny directory is quicker to build.
    _, ref = run_reference("text.tokenize", ckpt_dir=str(tiny_checkpoint), texts=TEXTS)
    tokenizer = TextTokenizer.from_dir(tiny_checkpoint)
    assert ref["len"] == tokenizer.vocab_size
    assert [normalize_text(t) for t in TEXTS] == ref["normalized"]
    assert [tokenizer.encode(normalize_text(t)) for t in TEXTS] == ref["ids"]
    assert [tokenizer.encode(t) for t in TEXTS] == ref["raw_ids"]
    assert len(TEXTS) == 30
