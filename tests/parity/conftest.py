"""Parity fixtures: a full-size random checkpoint and the reference oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatterbox.testing import make_checkpoint
from reference.oracle import REF_PYTHON, reference_available


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size seed-0 fixture; ``CHATTERBOX_FULL_CHECKPOINT`` reuses a directory built earlier
    (``python -m chatterbox.testing make-checkpoint DIR --size full --seed 0``)."""
    prebuilt = os.environ.get("CHATTERBOX_FULL_CHECKPOINT")
    if prebuilt:
        return Path(prebuilt)
    return make_checkpoint(tmp_path_factory.mktemp("full-checkpoint"), size="full", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _require_reference() -> None:
    # A parity run without the oracle must fail loudly, never pass by skipping everything.
    if not reference_available():
        pytest.fail(f"reference venv missing ({REF_PYTHON}); run reference/setup.sh first")
