"""Durable file writes for the voice store: a new file written and fsynced, a file replaced in one
step, a rename made durable."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # names being written; a crash leaves them behind for the store's sweep


def fsync_dir(path: Path) -> None:
    """Makes the directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Writes a file that must not exist yet, durably (written and fsynced before returning)."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` as one step: readers see the old file or the new one, never part."""
    temp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        write_new(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def older_than(path: Path, seconds: float, now: float) -> bool:
    try:
        return now - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False
