"""What each replica is built with: the one config object bound to each deployment by `build_app`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from chatterbox.engine import EngineConfig
from serve_app.config import (
    AppArgs,
    AuthConfig,
    ChunkingConfig,
    LimitsConfig,
    StitchingConfig,
    StrictConfig,
    VoicesConfig,
)
from serve_app.jobs.config import JobsConfig


class ModelSource(StrictConfig):
    """What one model replica loads."""

    model: str
    revision: str | None
    tiny_cache_dir: str
    device: Literal["auto", "cuda", "cpu"]
    dtype: Literal["float32", "float16", "bfloat16"] | None

    @classmethod
    def from_args(cls, args: AppArgs, device: str | None = None) -> ModelSource:
        """The model fields of ``args`` (``device`` overrides ``args.device``)."""
        return cls(
            model=args.model,
            revision=args.revision,
            tiny_cache_dir=args.tiny_cache_dir,
            device=device or args.device,
            dtype=args.dtype,
        )


class ModelArgs(StrictConfig):
    """What one TurboModel replica is built with."""

    source: ModelSource
    engine: EngineConfig
    voice_cache_size: int = Field(ge=1)
    # The deployment's `max_ongoing_requests`: the replica never holds more chunk calls, so more
    # engine slots could never fill. None: not in Serve (no such limit).
    max_ongoing_requests: int | None = None


class IngressArgs(StrictConfig):
    """What one ingress replica is built with."""

    chunking: ChunkingConfig
    stitching: StitchingConfig
    limits: LimitsConfig
    voices: VoicesConfig
    auth: AuthConfig
    jobs: JobsConfig
    max_new_tokens: int
    max_chunks_in_flight: int = Field(ge=1)

    def for_jobs(self) -> IngressArgs:
        """These settings with the jobs' text limit: what jobs are prepared with."""
        limits = self.limits.model_copy(update={"max_text_chars": self.jobs.max_text_chars})
        return self.model_copy(update={"limits": limits})


def model_args(args: AppArgs) -> ModelArgs:
    """What each TurboModel replica of ``args`` is built with."""
    return ModelArgs(
        source=ModelSource.from_args(args),
        engine=args.engine,
        voice_cache_size=args.voice_cache_size,
        max_ongoing_requests=args.model_max_ongoing,
    )


def ingress_args(args: AppArgs, on_gpu: bool) -> IngressArgs:
    """What each ingress replica of ``args`` is built with (``on_gpu``: the model replicas are)."""
    return IngressArgs(
        chunking=args.chunking,
        stitching=args.stitching,
        limits=args.limits,
        voices=args.voices,
        auth=args.auth,
        jobs=args.jobs,
        max_new_tokens=args.max_new_tokens,
        max_chunks_in_flight=args.chunks_in_flight(on_gpu),
    )
