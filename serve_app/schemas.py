"""Messages of the Serve graph: the handle API, and what deployments pass each other (each HTTP
API's own bodies are in its module of `serve_app.api`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatterbox.engine import EngineStats, VocoderStats
from chatterbox.sampling import SAMPLING_BOUNDS, Bounds, SamplingParams
from serve_app.synthesis.audio import AudioFormat
from serve_app.voices.store import BUILT_IN_VOICE, VOICE_NAME


def _sampling_field(name: str, bounds: Bounds | None = None) -> Any:
    """A sampling setting as an API field: the engine's default, and its bounds unless given."""
    bounds = bounds or SAMPLING_BOUNDS[name]
    return Field(getattr(SamplingParams(), name), **bounds.field_kwargs())


# What a request chooses of its sampling; max_new_tokens is the deployment's.
_REQUEST_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} - {"max_new_tokens"}
# Narrower than the engine's seed bound, so that chunk i's seed (seed + i) is always a valid one.
MAX_REQUEST_SEED = 2**31
# Characters no speech text has and that break encoders downstream: C0/C1 controls other than tab,
# newline and carriage return, and lone surrogates (JSON "\ud800" decodes to one; UTF-8 has none).
FORBIDDEN_TEXT_CHARS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff"
# Text as the ingress takes it, for the published schema: no control character, and something
# besides whitespace (text that is only whitespace is refused as `empty_text`). Lone surrogates are
# left out: UTF-8 cannot hold them, and regex engines of other languages refuse them in a pattern.
_CONTROLS = FORBIDDEN_TEXT_CHARS.removesuffix(r"\ud800-\udfff")
SPEAKABLE_TEXT = rf"^[^{_CONTROLS}]*[^\s{_CONTROLS}][^{_CONTROLS}]*$"
TEXT_SCHEMA = {"minLength": 1, "pattern": SPEAKABLE_TEXT}
# A saved voice's id or name (the store refuses anything else), or "default".
VOICE_SCHEMA = {"pattern": f"^{VOICE_NAME.pattern}$"}


class SynthesisParams(BaseModel):
    """Options shared by the HTTP and handle APIs (sampling defaults and bounds are the engine's)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(json_schema_extra=TEXT_SCHEMA)
    # A saved voice (serve_app.voices.store), by id or name; None or "default": the built-in voice (or
    # the reference clip, if one is sent).
    voice: str | None = Field(None, json_schema_extra=VOICE_SCHEMA)
    format: AudioFormat = "wav"
    seed: int | None = _sampling_field("seed", replace(SAMPLING_BOUNDS["seed"], lt=MAX_REQUEST_SEED))
    temperature: float = _sampling_field("temperature")
    top_p: float = _sampling_field("top_p")
    top_k: int = _sampling_field("top_k")
    repetition_penalty: float = _sampling_field("repetition_penalty")

    @field_validator("voice")
    @classmethod
    def _built_in_voice_is_none(cls, voice: str | None) -> str | None:
        return None if voice == BUILT_IN_VOICE else voice

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """The request's sampling settings (the seed is its first chunk's); raises TTSInputError
        naming a bad one (a handle caller may have set an attribute past validation)."""
        settings = self.model_dump(include=_REQUEST_SAMPLING_FIELDS)
        return SamplingParams(**settings, max_new_tokens=max_new_tokens)


class SynthesisRequest(SynthesisParams):
    """Handle API input: `handle.synthesize.remote(SynthesisRequest(...))`. No voice and no reference:
    the built-in voice."""

    reference_audio: bytes | None = None  # an encoded file: wav, flac, ogg or mp3, >= 5 s


class ChunkInfo(BaseModel):
    """Where one chunk's audio sits in the joined audio (seconds = samples / sample_rate)."""

    text: str
    start_sample: int
    num_samples: int


class SynthesisResult(BaseModel):
    """Handle API output; the HTTP response carries the same fields with the audio in base64."""

    audio: bytes
    sample_rate: int
    duration_s: float
    format: AudioFormat
    chunks: list[ChunkInfo]


class AudioPiece(BaseModel):
    """One piece of a streamed result (handle `synthesize_stream`): mono s16le samples that follow
    the previous piece's; the pieces in order are the whole result."""

    audio: bytes  # s16le, `num_samples` samples
    sample_rate: int
    start_sample: int
    num_samples: int
    chunks_done: int  # chunks of the text joined so far
    chunks_total: int


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about the model replicas."""

    sample_rate: int
    max_text_tokens: int


@dataclass(frozen=True)
class SharedReference:
    """A request's decoded reference clip, put in the object store once; replicas fetch it only on a
    voice-cache miss, so a 20-chunk request moves the audio at most once per replica."""

    reference_id: str  # ReferenceAudio.id: with the model's id, it names the voice (TurboTTS.voice_id)
    audio: ray.ObjectRef  # -> chatterbox.voice.ReferenceAudio


@dataclass(frozen=True)
class StoredVoiceReference:
    """A saved voice: replicas load its conditionals for their model from the store, or prepare
    them from its stored clip (and store them) on a voice-cache miss."""

    reference_id: str  # of the stored clip, as in SharedReference
    store_dir: str  # VoicesConfig.store_dir
    voice_id: str  # SavedVoice.id


@dataclass(frozen=True)
class ChunkJob:
    """One model call: a chunk of text with its voice and sampling settings."""

    request_id: str  # the user request it belongs to: replicas batch requests round-robin
    text: str
    voice: SharedReference | StoredVoiceReference | None  # None: the checkpoint's built-in voice
    sampling: SamplingParams  # the request's, with seed + i as chunk i's seed


@dataclass(frozen=True)
class ReplicaStats:
    """Chunk calls of one replica since it started, and its engine's counters (since the engine was
    built: a change of `max_batch_size` builds a new one)."""

    chunks_received: int  # synthesize_chunk calls taken by a healthy replica
    chunks_submitted: int  # handed to the engine (their voice was ready)
    chunks_finished: int  # answered with audio
    chunks_cancelled: int  # their caller went away first (client gone, or a sibling chunk failed)
    voices_prepared: int
    max_batch_size: int  # the engine's KV-cache slots
    engine: EngineStats
    streaming: VocoderStats  # the engine's vocoder stage (whole chunks and token-level streams)
