"""Finding checkpoints: the cached tiny model, local dirs, the Hugging Face cache offline, clear failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatterbox import testing
from chatterbox.errors import ModelNotAvailableError
from chatterbox.hub import Checkpoint, cached_tiny_checkpoint, resolve_checkpoint, resolve_model
from chatterbox.testing import CHECKPOINT_FILES

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


def test_tiny_model_is_built_once_under_the_cache_dir(tmp_path: Path):
    first = resolve_model("tiny", tiny_cache_dir=tmp_path)
    assert first.path == tmp_path / "turbo-tiny-seed0"
    assert first.model_id == str(first.path.resolve())
    assert sorted(p.name for p in first.path.iterdir()) == sorted(CHECKPOINT_FILES)
    built_at = (first.path / "t3_turbo_v1.safetensors").stat().st_mtime_ns
    again = resolve_model("tiny", tiny_cache_dir=tmp_path)
    assert again == first
    assert (again.path / "t3_turbo_v1.safetensors").stat().st_mtime_ns == built_at  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["turbo-tiny-seed0"]  # no scratch left


def test_a_failed_tiny_build_leaves_no_scratch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def fail_halfway(out_dir: Path, size: str, seed: int) -> Path:
        (Path(out_dir) / "vocab.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(testing, "make_checkpoint", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        cached_tiny_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_build_that_loses_the_race_uses_the_winner(tmp_path: Path, tiny_checkpoint: Path):
    def finish_second(out_dir: Path, size: str, seed: int) -> Path:
        shutil.copytree(tiny_checkpoint, out_dir, dirs_exist_ok=True)
        shutil.copytree(tiny_checkpoint, tmp_path / "turbo-tiny-seed0")  # the other builder wins
        return Path(out_dir)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(testing, "make_checkpoint", finish_second)
        assert cached_tiny_checkpoint(tmp_path) == tmp_path / "turbo-tiny-seed0"
    assert [p.name for p in tmp_path.iterdir()] == ["turbo-tiny-seed0"]


def test_a_model_source_is_a_local_dir_or_else_a_repo_id(tmp_path: Path, tiny_checkpoint: Path):
    assert resolve_model(str(tiny_checkpoint)) == Checkpoint(tiny_checkpoint, str(tiny_checkpoint.resolve()))
    code = "from chatterbox.hub import resolve_model; resolve_model('someone/no-such-model')"
    proc = _run_offline(code, tmp_path / "cache")
    assert proc.returncode != 0
    assert "the weights of someone/no-such-model are not in the local Hugging Face cache" in proc.stderr
