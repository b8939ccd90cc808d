"""Strict checkpoint loading shared by every component.

Components read their dimensions from the tensors (layer counts from key indices, widths from
shapes; attention heads are always 64 wide), so the official files and our tiny fixtures load
through one code path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file does not match the module it is loaded into."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return load_file(str(path))


def require_keys(state_dict: Mapping[str, torch.Tensor], keys: tuple[str, ...], what: str) -> None:
    """Fail clearly when tensors a config reads its dimensions from are absent."""
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise CheckpointError(f"{what}: checkpoint is missing {missing}")


def subdict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (e.g. ``"flow."``) with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def count_indexed(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many consecutive ``{prefix}{i}.`` blocks exist (e.g. ``"tfmr.h."`` -> 24)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"non-consecutive blocks under {prefix!r}: {sorted(indices)}")
    return len(indices)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Fill every parameter and buffer of ``module`` from ``state_dict``, consuming every key.

    Tensors are cast to each target's dtype (the official file stores int64 batch-norm counters
    as float32). Any key left over on either side, or any shape mismatch, raises with the names.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs module {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{what}: checkpoint does not match the module "
            f"(missing {missing[:10]}, unexpected {unexpected[:10]}, shape {wrong_shape[:10]})"
        )
    cast = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True)
