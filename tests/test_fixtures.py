"""The checkpoint fixtures: official file names and formats, same keys at both sizes, seeded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from chatterbox.constants import PARALINGUISTIC_TAGS
from chatterbox.testing import CHECKPOINT_FILES, checkpoint_layout, make_checkpoint

WEIGHT_FILES = ("t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors")


def test_tiny_checkpoint_has_the_nine_official_files(tiny_checkpoint: Path):
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == sorted(CHECKPOINT_FILES)


def test_full_layout_has_the_official_key_counts_and_shapes():
    layout = checkpoint_layout("full")
    assert {f: len(keys) for f, keys in layout.items()} == {
        "t3_turbo_v1.safetensors": 299,
        "s3gen_meanflow.safetensors": 2491,
        "ve.safetensors": 16,
    }
    t3, s3gen, ve = (layout[f] for f in WEIGHT_FILES)
    assert t3["tfmr.h.23.attn.c_attn.weight"] == (1024, 3072)  # GPT-2 Conv1D: [in, out]
    assert t3["text_emb.weight"] == (50276, 1024)
    assert t3["speech_head.bias"] == (6563,)
    assert s3gen["tokenizer._mel_filters"] == (128, 201)
    assert s3gen["flow.decoder.estimator.time_embed_mixer.weight"] == (1024, 2048)
    assert s3gen["mel2wav.ups.0.parametrizations.weight.original0"] == (512, 1, 1)
    assert s3gen["speaker_encoder.xvector.dense.linear.weight"] == (192, 1024, 1)
    assert ve["lstm.weight_ih_l0"] == (1024, 40)
    # Parameter counts of the spec (section 7), buffers aside.
    t3_params = sum(torch.Size(s).numel() for s in t3.values())
    assert t3_params == 478_862_755


def test_tiny_has_the_same_keys_as_full(tiny_checkpoint: Path):
    full = checkpoint_layout("full")
    for file in WEIGHT_FILES:
        tiny = load_file(tiny_checkpoint / file)
        assert set(tiny) == set(full[file]), file
        assert all(t.dtype == torch.float32 for t in tiny.values())
        assert all(torch.isfinite(t).all() for t in tiny.values())
        # smaller, not equal, dimensions
        assert sum(t.numel() for t in tiny.values()) < sum(torch.Size(s).numel() for s in full[file].values())


def test_same_seed_same_weights_other_seed_other_weights(tiny_checkpoint: Path, tmp_path: Path):
    again = make_checkpoint(tmp_path / "again", size="tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", size="tiny", seed=1)
    for file in WEIGHT_FILES:
        a, b, c = (load_file(d / file) for d in (tiny_checkpoint, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), file
        deterministic = ("tokenizer._mel_filters", "tokenizer.window")  # real DSP buffers, not weights
        random_keys = [k for k in a if a[k].numel() > 1 and a[k].std() > 0 and k not in deterministic]
        assert random_keys and not any(torch.equal(a[k], c[k]) for k in random_keys), file
    assert (tiny_checkpoint / "vocab.json").read_bytes() == (other / "vocab.json").read_bytes()


def test_builtin_voice_has_the_official_structure(tiny_checkpoint: Path):
    conds = torch.load(tiny_checkpoint / "conds.pt", weights_only=True)
    t3, gen = conds["t3"], conds["gen"]
    assert t3["clap_emb"] is None and t3["cond_prompt_speech_emb"] is None
    assert t3["speaker_emb"].shape == (1, 64) and torch.isclose(t3["speaker_emb"].norm(), torch.tensor(1.0))
    assert t3["cond_prompt_speech_tokens"].dtype == torch.int64
    assert int(t3["cond_prompt_speech_tokens"].max()) < 6561
    n = int(gen["prompt_token_len"][0])
    assert gen["prompt_token"].shape == (1, n)
    assert gen["prompt_feat"].shape == (1, 2 * n, 80)
    assert gen["prompt_feat_len"] is None
    assert gen["embedding"].shape == (1, 192)
    t3_vocab = load_file(tiny_checkpoint / "t3_turbo_v1.safetensors")["cond_enc.spkr_enc.weight"].shape[1]
    assert t3_vocab == t3["speaker_emb"].shape[1]


def test_tokenizer_files_are_a_working_gpt2_style_bpe(tiny_checkpoint: Path):
    vocab = json.loads((tiny_checkpoint / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == len(vocab) - 1  # last, as in GPT-2
    assert vocab["!"] == 0
    added = json.loads((tiny_checkpoint / "added_tokens.json").read_text())
    assert list(added) == list(PARALINGUISTIC_TAGS)
    assert sorted(added.values()) == list(range(len(vocab), len(vocab) + 19))
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["model_max_length"] == 1024

    bpe = models.BPE.from_file(str(tiny_checkpoint / "vocab.json"), str(tiny_checkpoint / "merges.txt"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(list(PARALINGUISTIC_TAGS))
    text = "Hello world, the quick brown fox! [laugh] Ünïcödé 123."
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert added["[laugh]"] in ids
    # merges were learned: a common word (with its leading space) is one token
    assert len(tok.encode(" the").ids) == 1


def test_text_vocab_of_tiny_t3_follows_the_tokenizer(tiny_checkpoint: Path):
    n_ids = len(json.loads((tiny_checkpoint / "vocab.json").read_text())) + len(PARALINGUISTIC_TAGS)
    t3 = load_file(tiny_checkpoint / "t3_turbo_v1.safetensors")
    assert t3["text_emb.weight"].shape[0] == n_ids == t3["tfmr.wte.weight"].shape[0]


def test_make_checkpoint_rejects_unknown_size(tmp_path: Path):
    with pytest.raises(ValueError, match="size must be one of"):
        make_checkpoint(tmp_path, size="huge")


def test_cli_writes_a_checkpoint(tmp_path: Path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatterbox.testing",
            "make-checkpoint",
            str(out),
            "--size",
            "tiny",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote tiny checkpoint (seed 3)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(CHECKPOINT_FILES)


def test_nano_is_turbo_with_a_gpt2_small_t3():
    nano, full = checkpoint_layout("nano"), checkpoint_layout("full")
    t3 = nano["t3_turbo_v1.safetensors"]
    assert t3["tfmr.wpe.weight"] == (8196, 768)
    assert sum(key.endswith(".ln_1.weight") for key in t3) == 12
    assert nano["s3gen_meanflow.safetensors"] == full["s3gen_meanflow.safetensors"]
