"""Shared fixtures: checkpoint directories the tests build themselves (weights cannot be downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatterbox.testing import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), size="tiny", seed=0)
