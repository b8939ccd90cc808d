"""Text front end: upstream's punctuation normalisation and the GPT-2 BPE tokenizer (plus the 19 tags).

The tokenizer is rebuilt with the HF ``tokenizers`` library from the checkpoint's own files
(``vocab.json``, ``merges.txt``, ``added_tokens.json``, ``tokenizer_config.json``), matching what
``transformers.AutoTokenizer`` builds for a GPT-2 tokenizer without needing ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from chatterbox.weights import CheckpointError

EMPTY_TEXT_FALLBACK = "You need to add some text for me to talk."
# Applied in this order, as upstream does: typographic and LLM punctuation the model rarely saw.
_PUNCTUATION_REPLACEMENTS = (
    ("…", ", "),
    (":", ","),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)
_SENTENCE_ENDINGS = (".", "!", "?", "-", ",")


def normalize_text(text: str) -> str:
    """Upstream's ``punc_norm``: capitalise, collapse whitespace, replace rare punctuation, end a sentence."""
    if not text:
        return EMPTY_TEXT_FALLBACK
    if text[0].islower():  # checked before whitespace collapsing, as upstream does
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in _PUNCTUATION_REPLACEMENTS:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(_SENTENCE_ENDINGS):
        text += "."
    return text


class TextTokenizer:
    """GPT-2 byte-level BPE plus the checkpoint's added tokens (the paralinguistic tags)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self._tokenizer = tokenizer
        self.max_length = max_length  # upstream truncates here; we refuse longer text instead

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> TextTokenizer:
        ckpt_dir = Path(ckpt_dir)
        vocab, merges = ckpt_dir / "vocab.json", ckpt_dir / "merges.txt"
        for path in (vocab, merges):
            if not path.is_file():
                raise CheckpointError(f"tokenizer file not found: {path}")
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()

        config_path = ckpt_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        added = _added_tokens(ckpt_dir, config)
        for token_id in sorted(added):
            token = added[token_id]
            if token.special:
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
            if tokenizer.token_to_id(token.content) != token_id:
                raise CheckpointError(
                    f"added token {token.content!r} got id {tokenizer.token_to_id(token.content)}, "
                    f"the checkpoint says {token_id}"
                )
        max_length = int(config.get("model_max_length", 1024))
        return cls(tokenizer, max_length)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as given (no normalisation, no BOS/EOS)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def _added_tokens(ckpt_dir: Path, config: dict) -> dict[int, AddedToken]:
    """Added tokens by id, with the flags ``tokenizer_config.json`` gives (else plain tokens)."""
    added: dict[int, AddedToken] = {}
    for token_id, spec in config.get("added_tokens_decoder", {}).items():
        added[int(token_id)] = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", not spec.get("special", False)),
            special=spec.get("special", False),
        )
    added_path = ckpt_dir / "added_tokens.json"
    if added_path.is_file():
        for content, token_id in json.loads(added_path.read_text()).items():
            added.setdefault(int(token_id), AddedToken(content, normalized=True, special=False))
    return added
