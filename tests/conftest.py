"""Shared fixtures: checkpoint directories the tests build themselves (weights cannot be downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatterbox.testing import make_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Test shapes are small, and an OpenMP team waiting for a busy core stalls every op: on a
    shared 2-core machine the T3 tests took 140 s with 2 threads and 7 s with 1."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), size="tiny", seed=0)
