"""Reference tasks for the text front end: upstream punc_norm and its AutoTokenizer."""

from __future__ import annotations

from chatterbox.tts_turbo import punc_norm
from transformers import AutoTokenizer


def tokenize(tensors: dict, params: dict) -> tuple[dict, dict]:
    """For each text: upstream's normalised text and the ids ``generate`` feeds T3."""
    tokenizer = AutoTokenizer.from_pretrained(params["ckpt_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    normalized = [punc_norm(text) for text in params["texts"]]
    ids = [
        tokenizer(text, return_tensors="pt", padding=True, truncation=True).input_ids[0].tolist()
        for text in normalized
    ]
    raw_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in params["texts"]]
    return {}, {"normalized": normalized, "ids": ids, "raw_ids": raw_ids, "len": len(tokenizer)}
