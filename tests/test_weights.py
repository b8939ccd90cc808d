"""Strict loading: every key consumed, every parameter filled, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatterbox.weights import CheckpointError, count_indexed, load_strict, subdict


def _module() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def test_load_strict_fills_everything_and_casts_batch_counters():
    module = _module()
    sd = {k: torch.ones_like(v, dtype=torch.float32) for k, v in module.state_dict().items()}
    load_strict(module, sd, "toy")
    assert torch.equal(module[0].weight, torch.ones(3, 2))
    assert module[1].num_batches_tracked.dtype == torch.int64  # F32 in the file, int64 in the module


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("0.bias"), "missing \\['0.bias'\\]"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (
            lambda sd: sd.update({"0.weight": torch.zeros(3, 5)}),
            "0.weight: file \\(3, 5\\) vs module \\(3, 2\\)",
        ),
    ],
)
def test_load_strict_names_what_does_not_match(edit, message):
    module = _module()
    sd = dict(module.state_dict())
    edit(sd)
    with pytest.raises(CheckpointError, match=message):
        load_strict(module, sd, "toy")


def test_count_indexed_and_subdict():
    sd = {f"tfmr.h.{i}.ln.weight": torch.zeros(1) for i in range(3)} | {"tfmr.wpe.weight": torch.zeros(1)}
    assert count_indexed(sd, "tfmr.h.") == 3
    assert set(subdict(sd, "tfmr.")) == {"h.0.ln.weight", "h.1.ln.weight", "h.2.ln.weight", "wpe.weight"}
    with pytest.raises(CheckpointError, match="non-consecutive"):
        count_indexed({"a.0.w": torch.zeros(1), "a.2.w": torch.zeros(1)}, "a.")
