"""Finding checkpoint directories: the built-in tiny checkpoint, a local directory, the Hugging Face
cache, or a download."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from chatterbox.constants import TURBO_REPO_ID
from chatterbox.errors import ModelNotAvailableError

# What upstream downloads (it skips the non-meanflow s3gen.safetensors only by not loading it).
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.pt", "*.model"]
REQUIRED_FILES = ("s3gen_meanflow.safetensors", "ve.safetensors", "vocab.json", "merges.txt")
TINY_MODEL = "tiny"  # a seeded random checkpoint built locally (offline trial; it speaks noise)
DEFAULT_TINY_CACHE_DIR = "~/.cache/chatterbox-serve"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and the id naming its weights (part of every voice id)."""

    path: Path
    model_id: str


def t3_weights_file(ckpt_dir: Path) -> Path:
    """``t3_turbo_v1.safetensors`` (Turbo) or ``t3_nano_v1.safetensors`` (Nano)."""
    for name in ("t3_turbo_v1.safetensors", "t3_nano_v1.safetensors"):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise ModelNotAvailableError(f"no T3 weights (t3_turbo_v1/t3_nano_v1.safetensors) in {ckpt_dir}")


def _check_complete(ckpt_dir: Path, source: str) -> Path:
    missing = [name for name in REQUIRED_FILES if not (ckpt_dir / name).is_file()]
    if missing:
        raise ModelNotAvailableError(f"{source} at {ckpt_dir} lacks {', '.join(missing)}")
    t3_weights_file(ckpt_dir)
    return ckpt_dir


def resolve_checkpoint(
    repo_id: str = TURBO_REPO_ID, revision: str | None = None, local_dir: str | Path | None = None
) -> Path:
    """The directory holding the checkpoint files.

    ``local_dir`` is used as is. Otherwise the Hugging Face cache is used, downloading what is
    missing unless offline (``HF_HUB_OFFLINE=1``); failure says how to pre-download.
    """
    if local_dir is not None:
        path = Path(local_dir)
        if not path.is_dir():
            raise ModelNotAvailableError(f"checkpoint directory {path} does not exist")
        return _check_complete(path, "checkpoint directory")
    try:
        path = Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # offline, no network, unknown repo or revision, auth
        raise ModelNotAvailableError(
            f"the weights of {repo_id}"
            + (f"@{revision}" if revision else "")
            + f" are not in the local Hugging Face cache and could not be downloaded ({type(exc).__name__}: "
            f"{exc}). Pre-download them where the hub is reachable with "
            f"`python -m chatterbox download --repo {repo_id}` (same HF_HOME), or pass local_dir=DIR "
            "pointing at a directory with the checkpoint files."
        ) from exc
    return _check_complete(path, f"Hugging Face snapshot of {repo_id}")


def download(
    repo_id: str = TURBO_REPO_ID, revision: str | None = None, local_dir: str | Path | None = None
) -> Path:
    """Fetch a checkpoint into the HF cache (or ``local_dir``), e.g. while building an image."""
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            local_dir=str(local_dir) if local_dir is not None else None,
        )
    except Exception as exc:  # no network, offline mode, unknown repo or revision, auth
        raise ModelNotAvailableError(
            f"could not download {repo_id}"
            + (f"@{revision}" if revision else "")
            + f" ({type(exc).__name__}: {exc})"
        ) from exc
    return _check_complete(Path(path), f"download of {repo_id}")


def local_checkpoint(local_dir: str | Path) -> Checkpoint:
    """A checkpoint directory on disk, named by its resolved path."""
    path = resolve_checkpoint(local_dir=Path(local_dir).expanduser())
    return Checkpoint(path, str(path.resolve()))


def hub_checkpoint(repo_id: str = TURBO_REPO_ID, revision: str | None = None) -> Checkpoint:
    """A hub repo's checkpoint (cached or downloaded), named by repo and snapshot revision."""
    path = resolve_checkpoint(repo_id, revision=revision)
    return Checkpoint(path, f"{repo_id}@{path.name}")


def cached_tiny_checkpoint(cache_dir: str | Path = DEFAULT_TINY_CACHE_DIR, seed: int = 0) -> Path:
    """The seeded tiny checkpoint under ``cache_dir``, built once.

    Building happens in a scratch directory renamed into place, so processes racing to build it
    (Serve replicas starting together) never see a half-written checkpoint, and a failed build
    leaves nothing behind.
    """
    from chatterbox.testing import make_checkpoint  # torch-heavy: only when the tiny model is asked for

    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"turbo-tiny-seed{seed}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        make_checkpoint(scratch, size="tiny", seed=seed)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished first: its checkpoint is the same seeded one.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # already gone after a successful rename
    return target


def resolve_model(
    model: str, revision: str | None = None, tiny_cache_dir: str | Path = DEFAULT_TINY_CACHE_DIR
) -> Checkpoint:
    """The checkpoint a model source names: ``"tiny"``, an existing local directory, else a hub repo id."""
    if model == TINY_MODEL:
        return local_checkpoint(cached_tiny_checkpoint(tiny_cache_dir))
    if Path(model).expanduser().is_dir():
        return local_checkpoint(model)
    return hub_checkpoint(model, revision)
