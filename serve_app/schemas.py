"""Messages of the Serve graph: the HTTP API, the handle API, and what deployments pass each other."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from pydantic import BaseModel, ConfigDict, Field

from serve_app.audio import AudioFormat


class SynthesisParams(BaseModel):
    """Options shared by the HTTP and handle APIs (sampling defaults are the model's)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    format: AudioFormat = "wav"
    seed: int | None = Field(None, ge=0, lt=2**31)  # chunk i is generated with seed + i
    temperature: float = Field(0.8, gt=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(1000, ge=1, le=100_000)
    repetition_penalty: float = Field(1.2, ge=1.0, le=10.0)


class SynthesisRequest(SynthesisParams):
    """Handle API input: `handle.synthesize.remote(SynthesisRequest(...))`. No reference: built-in voice."""

    reference_audio: bytes | None = None  # an encoded file: wav, flac, ogg or mp3, >= 5 s


class TTSHttpRequest(SynthesisParams):
    """Body of `POST /v1/tts`."""

    reference_audio_base64: str | None = None


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


class TTSHttpResponse(BaseModel):
    audio_base64: str
    sample_rate: int
    duration_s: float
    format: AudioFormat
    chunks: list[ChunkInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer: `{"error": {"code", "message", "field"}}`."""

    error: ErrorDetail


class SynthesisError(Exception):
    """A request the service refuses or cannot serve; the HTTP status goes with it.

    Handle callers receive it as raised (Ray wraps it but keeps isinstance and the attributes).
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(status, code, message, field)  # args rebuild the error after pickling
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ChunkOutOfMemoryError(RuntimeError):
    """A single chunk did not fit in accelerator memory even alone (raised by a model replica)."""


class ReplicaBrokenError(RuntimeError):
    """A model replica hit a CUDA error and serves nothing more; Serve's health check replaces it."""


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about the model replicas."""

    sample_rate: int
    max_text_tokens: int


@dataclass(frozen=True)
class VoiceRef:
    """A decoded reference, put in the object store once per request; replicas fetch it only on a
    voice-cache miss, so a 20-chunk request moves the audio at most once per replica."""

    voice_id: str
    audio: ray.ObjectRef  # -> chatterbox.voice.ReferenceAudio


@dataclass(frozen=True)
class ChunkJob:
    """One model call: a chunk of text with its voice and sampling options."""

    request_id: str  # the user request it belongs to: replicas batch requests round-robin
    text: str
    voice: VoiceRef | None  # None: the checkpoint's built-in voice
    seed: int | None
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass(frozen=True)
class StitchPlan:
    """How the stitcher joins the chunk audio it receives (in this order)."""

    chunk_texts: list[str]
    pauses: list[int]  # samples after every chunk but the last
    crossfade: int  # samples
    sample_rate: int
    format: AudioFormat
