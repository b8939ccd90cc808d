"""Finding checkpoints: local directories, the Hugging Face cache in offline mode, clear failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatterbox.errors import ModelNotAvailableError
from chatterbox.hub import resolve_checkpoint

REVISION = "749d1c1a" + "0" * 32


def _run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    # huggingface_hub reads its settings at import time: use a fresh interpreter.
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf-home"),
    }
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)


def test_local_dir_is_used_as_is(tiny_checkpoint: Path):
    assert resolve_checkpoint(local_dir=tiny_checkpoint) == tiny_checkpoint


def test_missing_or_incomplete_local_dir_is_named(tmp_path: Path, tiny_checkpoint: Path):
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_checkpoint(local_dir=tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, partial)
    (partial / "ve.safetensors").unlink()
    with pytest.raises(ModelNotAvailableError, match=r"lacks ve\.safetensors"):
        resolve_checkpoint(local_dir=partial)


def test_offline_without_cache_says_how_to_predownload(tmp_path: Path):
    proc = _run_offline(
        "from chatterbox.hub import resolve_checkpoint; resolve_checkpoint()", tmp_path / "cache"
    )
    assert proc.returncode != 0
    assert "ResembleAI/chatterbox-turbo are not in the local Hugging Face cache" in proc.stderr
    assert "python -m chatterbox download --repo ResembleAI/chatterbox-turbo" in proc.stderr


def test_offline_uses_the_hub_cache(tmp_path: Path, tiny_checkpoint: Path):
    cache = tmp_path / "cache"
    repo = cache / "models--ResembleAI--chatterbox-turbo"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    proc = _run_offline("from chatterbox.hub import resolve_checkpoint; print(resolve_checkpoint())", cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(repo / "snapshots" / REVISION)


def test_download_cli_fails_cleanly_without_the_hub(tmp_path: Path):
    code = "import sys; from chatterbox.__main__ import main; sys.exit(main(['download']))"
    proc = _run_offline(code, tmp_path / "cache")
    assert proc.returncode == 2
    assert "error: could not download ResembleAI/chatterbox-turbo" in proc.stderr
    assert "Traceback" not in proc.stderr
