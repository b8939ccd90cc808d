"""The GPU profiles' slot counts follow from the bf16 KV cache per slot of the full-size T3.

Computed, not yet measured (no session has had a GPU): bench/gpu_suite.sh measures the peak memory
per slot capacity; when it has run, these constants and the configs' comments take its numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from chatterbox.constants import MAX_NEW_TOKENS, T3_PROMPT_TOKENS
from chatterbox.engine.kv_cache import SlotCache
from chatterbox.t3.gpt2 import GPT2Config
from chatterbox.testing import SIZES
from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parent.parent
MAX_TEXT_TOKENS = 1024  # the Turbo tokenizer's model_max_length (chatterbox/text.py's default)
# Per replica besides the KV cache (the configs' comments itemise them): weights, CUDA context,
# activation headroom (an S3Gen batch of 8 x 40 s chunks and one full-length prefill).
FIXED_BYTES = (1.6 + 0.5 + 3.3) * 1e9
USABLE = 0.9  # of the replica's GPU share; the rest is allocator fragmentation
SLOT_STEP = 16


def kv_bytes_per_slot() -> int:
    """What TurboEngine allocates per slot at its default max_positions (the longest possible row)."""
    full = SIZES["full"]
    config = GPT2Config(width=full.t3_width, layers=full.t3_layers, positions=full.t3_positions)
    positions = min(1 + T3_PROMPT_TOKENS + MAX_TEXT_TOKENS + 1 + MAX_NEW_TOKENS + 1, config.positions)
    return SlotCache.nbytes_for(config, 1, positions, torch.bfloat16)


def prefix_bytes_per_voice() -> int:
    """K/V of one voice's prefix (speaker embedding + 375 prompt tokens), kept per cached voice."""
    full = SIZES["full"]
    config = GPT2Config(width=full.t3_width, layers=full.t3_layers, positions=full.t3_positions)
    return SlotCache.nbytes_for(config, 1, 1 + T3_PROMPT_TOKENS, torch.bfloat16)


def test_kv_cache_per_slot_is_what_the_configs_state():
    assert kv_bytes_per_slot() == 2402 * 96 * 1024
    assert round(kv_bytes_per_slot() / 1e9, 3) == 0.236
    assert round(prefix_bytes_per_voice() / 1e6) == 37


@pytest.mark.parametrize(("name", "gpu_bytes"), [("gpu-24gb.yaml", 24e9), ("gpu-80gb.yaml", 80e9)])
def test_slots_are_the_most_that_fit_the_replicas_share(name: str, gpu_bytes: float):
    """In steps of 16 slots (each its own CUDA-graph bucket, the engine's top one)."""
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.dtype == "bfloat16"
    budget = USABLE * args.num_gpus * gpu_bytes

    def needed(slots: int) -> float:
        return FIXED_BYTES + args.voice_cache_size * prefix_bytes_per_voice() + slots * kv_bytes_per_slot()

    slots = args.max_batch_size
    assert slots % SLOT_STEP == 0
    assert needed(slots) <= budget < needed(slots + SLOT_STEP)
