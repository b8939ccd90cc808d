"""Saved voices on a filesystem every replica shares (a mounted volume in a cluster).

Layout under the store's root:

    index.json                      {voice id: name} of every saved voice: the store's commit point
    voice_<24 hex>/voice.json       metadata (id, name, description, created_at, duration_s, reference_id)
    voice_<24 hex>/reference.npy    the normalised reference clip (float32, 24 kHz), as decoded once
    voice_<24 hex>/<engine voice id>.safetensors   conditionals prepared by one model's weights
    .lock                           serialises writers of index.json (flock; readers take no lock)

A voice exists exactly when index.json lists it. An upload writes its directory under a temporary
name, fsyncs it, renames it into place and then replaces index.json (temporary file, fsync, rename,
directory fsync): a crash at any point leaves either no voice or the whole voice, and what a crash
leaves behind (temporary names, directories index.json does not list) is swept later. Nothing is
kept in memory, so a voice one replica deletes is gone for every replica at once.

Conditionals are filed under the id the engine gives a voice (`TurboTTS.voice_id`: a hash of the
clip's id and the model's id), so conditionals made by other weights are never found, only
recomputed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from chatterbox.errors import TTSInputError
from chatterbox.voice import ReferenceAudio, Voice
from serve_app.voices.files import TEMP_PREFIX, fsync_dir, older_than, write_atomically, write_new

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = 64
MAX_DESCRIPTION_CHARS = 500
BUILT_IN_VOICE = "default"  # the checkpoint's own voice: no saved voice may take its name
VOICE_ID = re.compile(r"voice_[0-9a-f]{24}")
# Letters, digits, '.', '_', '-', starting with a letter or digit: never a path, never "..".
VOICE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
_ENGINE_VOICE_ID = re.compile(r"[0-9a-f]{64}")  # TurboTTS.voice_id: a sha256
# Temporary and deleted entries of other processes may still be in use; older ones are debris.
STALE_AFTER_S = 3600.0

_INDEX = "index.json"
_LOCK = ".lock"
_METADATA = "voice.json"
_REFERENCE = "reference.npy"
_CONDITIONALS_SUFFIX = ".safetensors"
_TRASH_PREFIX = ".trash-"


class VoiceNotFoundError(TTSInputError):
    code = "voice_not_found"


class VoiceExistsError(TTSInputError):
    code = "voice_exists"


class VoiceLimitError(TTSInputError):
    code = "voice_limit_reached"


@dataclass(frozen=True)
class SavedVoice:
    """A saved voice's metadata; independent of the model (its conditionals are stored per model)."""

    id: str
    name: str
    description: str
    created_at: int  # Unix seconds
    duration_s: float  # of the normalised reference clip
    reference_id: str  # ReferenceAudio.id of the clip: with a model's id, it names the prepared voice


def check_name(name: str, field: str = "name") -> None:
    if not VOICE_NAME.fullmatch(name):
        raise TTSInputError(
            f"{field}: 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
            field,
        )
    if name.casefold() == BUILT_IN_VOICE or VOICE_ID.fullmatch(name):
        raise TTSInputError(f"{field}: {name!r} is reserved (the built-in voice, or a voice id)", field)


class VoiceStore:
    """The saved voices under `root`; every method reads the disk, so every process sees one store.

    Creating the object does no I/O (a model replica makes one per saved voice it loads).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # ----------------------------------------------------------------------------------- reading

    def voices(self) -> list[SavedVoice]:
        """Every saved voice, oldest first (in the order saved: the index keeps it)."""
        voices = []
        for voice_id in self._read_index():
            with contextlib.suppress(VoiceNotFoundError):  # deleted since the index was read
                voices.append(self._read_metadata(voice_id))
        return voices

    def get(self, id_or_name: str, field: str = "voice") -> SavedVoice:
        """The saved voice with this id or name; VoiceNotFoundError (naming `field`) if none."""
        return self._read_metadata(self._find(self._read_index(), id_or_name, field), field)

    def reference(self, voice_id: str) -> ReferenceAudio:
        """The voice's normalised clip, checked against its id (what the model prepares it from)."""
        voice = self._read_metadata(voice_id)
        try:
            data = (self._voice_dir(voice_id) / _REFERENCE).read_bytes()
        except FileNotFoundError:
            raise self._not_found(voice_id, "voice") from None
        wav = np.load(io.BytesIO(data), allow_pickle=False)
        if hashlib.sha256(wav.tobytes()).hexdigest() != voice.reference_id:
            raise RuntimeError(f"the stored clip of voice {voice_id} does not match its id (corrupt store?)")
        return ReferenceAudio(wav_24k=wav, id=voice.reference_id)

    def conditionals(self, voice_id: str, engine_voice_id: str) -> Voice | None:
        """The voice's conditionals as the model whose voice id is `engine_voice_id` prepared them,
        or None when that model has not stored them (other weights file theirs under other ids)."""
        path = self._conditionals_path(voice_id, engine_voice_id)
        try:
            voice = Voice.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return None
        if voice.id != engine_voice_id:
            logger.warning("ignoring %s: it holds voice %s", path, voice.id)
            return None
        return voice

    # ----------------------------------------------------------------------------------- writing

    def create(self, name: str, description: str, reference: ReferenceAudio, max_voices: int) -> SavedVoice:
        """Saves a voice under a new id; VoiceExistsError for a name taken, VoiceLimitError when the
        store holds `max_voices`. All or nothing: on any failure nothing of it remains."""
        check_name(name)
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise TTSInputError(f"description: at most {MAX_DESCRIPTION_CHARS} characters", "description")
        voice = SavedVoice(
            id=f"voice_{uuid.uuid4().hex[:24]}",
            name=name,
            description=description,
            created_at=int(time.time()),
            duration_s=round(reference.duration_s, 3),
            reference_id=reference.id,
        )
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            clip = io.BytesIO()
            np.save(clip, reference.wav_24k, allow_pickle=False)
            write_new(staging / _REFERENCE, clip.getvalue())
            write_new(staging / _METADATA, json.dumps(asdict(voice)).encode())
            fsync_dir(staging)
            with self._locked():
                index = self._read_index()
                self._check_room(index, name, max_voices)
                os.replace(staging, self._voice_dir(voice.id))
                try:
                    self._write_index({**index, voice.id: name})
                except BaseException:
                    shutil.rmtree(self._voice_dir(voice.id), ignore_errors=True)
                    raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return voice

    def delete(self, id_or_name: str, field: str = "voice_id") -> SavedVoice:
        """Deletes a voice: gone for every reader once index.json no longer lists it."""
        with self._locked():
            index = self._read_index()
            voice_id = self._find(index, id_or_name, field)
            voice = self._read_metadata(voice_id, field)
            self._write_index({other: name for other, name in index.items() if other != voice_id})
        self._discard(self._voice_dir(voice_id))
        return voice

    def save_conditionals(self, voice_id: str, prepared: Voice) -> None:
        """Stores a model's conditionals of a saved voice (if the voice still exists)."""
        path = self._conditionals_path(voice_id, prepared.id)
        try:
            write_atomically(path, prepared.to_bytes())
        except FileNotFoundError:  # the voice was deleted meanwhile
            logger.info("voice %s was deleted; its conditionals are not stored", voice_id)
        except OSError:  # a full or read-only volume: synthesis goes on, the next miss prepares again
            logger.warning("could not store the conditionals of voice %s", voice_id, exc_info=True)

    def sweep(self) -> None:
        """Removes what interrupted writes and deletes left behind: directories the index does not
        list, deleted directories, and temporary files older than STALE_AFTER_S."""
        if not self.root.is_dir():
            return
        now = time.time()
        with self._locked():
            listed = set(self._read_index())
            for entry in self.root.iterdir():
                name = entry.name
                unlisted = VOICE_ID.fullmatch(name) is not None and name not in listed
                stale = name.startswith(TEMP_PREFIX) and older_than(entry, STALE_AFTER_S, now)
                if unlisted or stale or name.startswith(_TRASH_PREFIX):
                    self._discard(entry)
                elif name in listed:
                    for file in entry.glob(f"{TEMP_PREFIX}*"):
                        if older_than(file, STALE_AFTER_S, now):
                            file.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------- internals

    def _voice_dir(self, voice_id: str) -> Path:
        if not VOICE_ID.fullmatch(voice_id):  # the only names joined onto the root
            raise ValueError(f"not a voice id: {voice_id!r}")
        return self.root / voice_id

    def _conditionals_path(self, voice_id: str, engine_voice_id: str) -> Path:
        if not _ENGINE_VOICE_ID.fullmatch(engine_voice_id):
            raise ValueError(f"not an engine voice id: {engine_voice_id!r}")
        return self._voice_dir(voice_id) / f"{engine_voice_id}{_CONDITIONALS_SUFFIX}"

    def _find(self, index: dict[str, str], id_or_name: str, field: str) -> str:
        if id_or_name in index:
            return id_or_name
        if not VOICE_ID.fullmatch(id_or_name) and not VOICE_NAME.fullmatch(id_or_name):
            raise TTSInputError(
                f"{field}: not a voice id (voice_ + 24 hex digits) or a voice name "
                f"(1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-')",
                field,
            )
        for voice_id, name in index.items():
            if name == id_or_name:
                return voice_id
        raise self._not_found(id_or_name, field)

    def _check_room(self, index: dict[str, str], name: str, max_voices: int) -> None:
        if any(other.casefold() == name.casefold() for other in index.values()):
            raise VoiceExistsError(f"name: a voice named {name!r} exists (names ignore case)", "name")
        if len(index) >= max_voices:
            raise VoiceLimitError(
                f"the store holds {len(index)} voices, its limit (voices.max_voices); delete one first"
            )

    def _read_index(self) -> dict[str, str]:
        try:
            data = (self.root / _INDEX).read_bytes()
        except FileNotFoundError:
            return {}
        voices = json.loads(data)["voices"]
        return {voice_id: name for voice_id, name in voices.items() if VOICE_ID.fullmatch(voice_id)}

    def _write_index(self, index: dict[str, str]) -> None:
        write_atomically(self.root / _INDEX, json.dumps({"voices": index}, indent=1).encode())

    def _read_metadata(self, voice_id: str, field: str = "voice") -> SavedVoice:
        try:
            data = (self._voice_dir(voice_id) / _METADATA).read_bytes()
        except FileNotFoundError:
            raise self._not_found(voice_id, field) from None
        return SavedVoice(**json.loads(data))

    @staticmethod
    def _not_found(id_or_name: str, field: str) -> VoiceNotFoundError:
        return VoiceNotFoundError(f"{field}: no saved voice has the id or name {id_or_name!r}", field)

    def _discard(self, path: Path) -> None:
        """Renames a directory out of sight (one atomic step), then removes it."""
        trash = path
        if not path.name.startswith(_TRASH_PREFIX):
            trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
            try:
                os.replace(path, trash)
            except FileNotFoundError:
                return  # another process removed it
            fsync_dir(self.root)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Excludes other writers of index.json, in every process (flock: the filesystem must support
        it; local disks, NFSv4 and the usual ReadWriteMany volumes do)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / _LOCK, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
