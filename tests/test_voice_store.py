"""The saved-voice store on a temporary directory, without Ray: what every process sees, what a
failed or interrupted write leaves (nothing), what it refuses, and conditionals kept per model."""

import asyncio
import copy
import os
import time
from pathlib import Path

import pytest
import torch

from chatterbox.errors import TTSInputError
from chatterbox.hub import local_checkpoint
from chatterbox.tts import TurboTTS
from chatterbox.voice import ReferenceAudio, Voice, decode_reference_audio
from serve_app.schemas import StoredVoiceReference
from serve_app.voices.cache import VoiceCache
from serve_app.voices.store import (
    STALE_AFTER_S,
    VoiceExistsError,
    VoiceLimitError,
    VoiceNotFoundError,
    VoiceStore,
)
from tests.serve.conftest import voice_wav

MAX_VOICES = 10


@pytest.fixture(scope="module")
def clip() -> ReferenceAudio:
    return decode_reference_audio(voice_wav(6.0))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "voices"


def entries(root: Path) -> set[str]:
    return {path.name for path in root.iterdir()}


def test_a_saved_voice_is_seen_by_every_store_on_the_directory(root, clip):
    writer, reader = VoiceStore(root), VoiceStore(root)  # as two replicas' stores
    saved = writer.create("alice", "calm, low", clip, MAX_VOICES)
    assert reader.get(saved.id) == reader.get("alice") == saved
    assert (saved.name, saved.description, saved.duration_s) == ("alice", "calm, low", 6.0)
    assert saved.reference_id == clip.id
    assert [voice.id for voice in reader.voices()] == [saved.id]
    stored = reader.reference(saved.id)
    assert stored.id == clip.id
    assert stored.wav_24k.dtype == clip.wav_24k.dtype
    assert stored.wav_24k.tobytes() == clip.wav_24k.tobytes()  # bit-exact: the same voice id


def test_a_voice_deleted_through_one_store_is_gone_for_all(root, clip):
    one, other = VoiceStore(root), VoiceStore(root)
    saved = one.create("bob", "", clip, MAX_VOICES)
    other.get("bob")
    assert one.delete("bob") == saved
    for lookup in (saved.id, "bob"):
        with pytest.raises(VoiceNotFoundError) as raised:
            other.get(lookup, "voice")
        assert raised.value.field == "voice"
    with pytest.raises(VoiceNotFoundError):
        other.reference(saved.id)
    assert other.voices() == []
    assert entries(root) == {".lock", "index.json"}  # its directory is removed too
    assert one.create("bob", "", clip, MAX_VOICES).name == "bob"  # the name is free again


def test_names_are_unique_ignoring_case_and_the_count_is_bounded(root, clip):
    store = VoiceStore(root)
    store.create("Alice", "", clip, max_voices=2)
    with pytest.raises(VoiceExistsError) as raised:
        store.create("alice", "", clip, max_voices=2)
    assert (raised.value.code, raised.value.field) == ("voice_exists", "name")
    store.create("carol", "", clip, max_voices=2)
    before = entries(root)
    with pytest.raises(VoiceLimitError, match="holds 2 voices") as raised:
        store.create("dave", "", clip, max_voices=2)
    assert raised.value.code == "voice_limit_reached"
    assert entries(root) == before  # nothing of the refused voice remains
    assert [voice.name for voice in store.voices()] == ["Alice", "carol"]


@pytest.mark.parametrize(
    "name", ["", "../x", "..", "a/b", "a\\b", ".hidden", "x" * 65, "default", "voice_" + "0" * 24, "é"]
)
def test_bad_names_are_refused(root, clip, name):
    with pytest.raises(TTSInputError) as raised:
        VoiceStore(root).create(name, "", clip, MAX_VOICES)
    assert raised.value.field == "name"
    assert not root.exists() or entries(root) <= {".lock"}


@pytest.mark.parametrize("lookup", ["../x", "../../etc/passwd", "..%2F..", "/tmp", "x" * 300, ""])
def test_lookups_that_are_neither_an_id_nor_a_name_are_refused(root, clip, lookup):
    store = VoiceStore(root)
    store.create("alice", "", clip, MAX_VOICES)
    with pytest.raises(TTSInputError) as raised:
        store.get(lookup, "voice_id")
    assert raised.value.field == "voice_id"
    assert not isinstance(raised.value, VoiceNotFoundError)  # refused as malformed, never looked up
    with pytest.raises(TTSInputError):
        store.delete(lookup)
    assert [voice.name for voice in store.voices()] == ["alice"]


def test_a_long_description_is_refused(root, clip):
    with pytest.raises(TTSInputError) as raised:
        VoiceStore(root).create("alice", "x" * 501, clip, MAX_VOICES)
    assert raised.value.field == "description"


@pytest.mark.parametrize("failing_call", [1, 2], ids=["publishing the directory", "replacing the index"])
def test_an_upload_that_fails_between_write_and_rename_leaves_nothing(root, clip, monkeypatch, failing_call):
    store = VoiceStore(root)
    kept = store.create("kept", "", clip, MAX_VOICES)
    before = entries(root)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("injected: disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        store.create("lost", "", clip, MAX_VOICES)
    monkeypatch.undo()
    assert [voice.id for voice in VoiceStore(root).voices()] == [kept.id]
    assert entries(root) == before  # no voice directory, no temporary file
    assert entries(root / kept.id) == {"voice.json", "reference.npy"}


def test_sweep_removes_what_a_killed_writer_left(root, clip):
    store = VoiceStore(root)
    kept = store.create("kept", "", clip, MAX_VOICES)
    old = time.time() - STALE_AFTER_S - 60
    debris = [
        root / ".tmp-0123",  # an upload killed before it was renamed into place
        root / ("voice_" + "a" * 24),  # one killed after the rename, before the index listed it
        root / ".trash-4567",  # a delete killed before it removed the directory
    ]
    for path in debris:
        path.mkdir()
        (path / "voice.json").write_text("{}")
        os.utime(path, (old, old))
    in_progress = root / ".tmp-89ab"  # another replica's upload, still being written
    in_progress.mkdir()
    stale_file = root / kept.id / ".tmp-cdef-x.safetensors"
    stale_file.write_bytes(b"half")
    os.utime(stale_file, (old, old))
    store.sweep()
    assert entries(root) == {".lock", "index.json", kept.id, in_progress.name}
    assert entries(root / kept.id) == {"voice.json", "reference.npy"}
    assert VoiceStore(root).get("kept") == kept


# --- conditionals per model, through a replica's VoiceCache -----------------------------------------


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_checkpoint(local_checkpoint(tiny_checkpoint), device="cpu")


def cache_of(tts: TurboTTS) -> VoiceCache:
    """A fresh replica's cache (as model.py makes it)."""

    async def prepare(clips: list[ReferenceAudio]) -> list[Voice | Exception]:
        return list(tts.prepare_voices(clips))

    return VoiceCache(4, voice_id=tts.voice_id, prepare=prepare)


def resolve(cache: VoiceCache, reference: StoredVoiceReference) -> Voice | BaseException:
    return asyncio.run(cache.resolve([reference]))[0]


def conditionals_files(root: Path, voice_id: str) -> set[str]:
    return {name for name in entries(root / voice_id) if name.endswith(".safetensors")}


def test_conditionals_are_stored_per_model_and_recomputed_for_other_weights(root, clip, tts):
    saved = VoiceStore(root).create("alice", "", clip, MAX_VOICES)
    reference = StoredVoiceReference(reference_id=saved.reference_id, store_dir=str(root), voice_id=saved.id)

    first_replica = cache_of(tts)
    prepared = resolve(first_replica, reference)
    assert first_replica.prepared == 1
    assert prepared.id == tts.voice_id(clip.id)
    assert conditionals_files(root, saved.id) == {f"{prepared.id}.safetensors"}

    next_replica = cache_of(tts)  # same weights: loads what the first one stored
    loaded = resolve(next_replica, reference)
    assert next_replica.prepared == 0
    assert loaded.id == prepared.id
    fresh = tts.prepare_voice(clip)
    for name in ("speaker_emb", "t3_prompt_tokens", "prompt_tokens", "prompt_feat", "embedding"):
        assert torch.equal(getattr(loaded.conditionals, name), getattr(fresh.conditionals, name))

    other_weights = copy.copy(tts)
    other_weights.model_id = "other-weights"
    retrained_replica = cache_of(other_weights)
    recomputed = resolve(retrained_replica, reference)
    assert retrained_replica.prepared == 1  # never the other model's conditionals
    assert recomputed.id == other_weights.voice_id(clip.id) != prepared.id
    assert conditionals_files(root, saved.id) == {
        f"{prepared.id}.safetensors",
        f"{recomputed.id}.safetensors",
    }


def test_a_deleted_voice_fails_only_its_own_chunks(root, clip, tts):
    store = VoiceStore(root)
    saved = store.create("alice", "", clip, MAX_VOICES)
    store.delete(saved.id)
    reference = StoredVoiceReference(reference_id=saved.reference_id, store_dir=str(root), voice_id=saved.id)
    outcome = resolve(cache_of(tts), reference)
    assert isinstance(outcome, VoiceNotFoundError)
    assert (outcome.code, outcome.field) == ("voice_not_found", "voice")
