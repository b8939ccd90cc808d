"""Typed configuration of the Serve application, validated once at the edge (`build_app(args)`).

`AppArgs` is what `serve run serve_app.app:build_app key=value ...` and the `args:` block of a Serve
config file are validated against. Its top-level fields are scalars, so the common knobs can be
set from the command line (`model=tiny num_gpus=0.5 max_batch_size=16`); the rest is grouped.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from chatterbox.constants import (
    MAX_NEW_TOKENS,
    MAX_REFERENCE_SECONDS,
    MIN_REFERENCE_SECONDS,
    TURBO_REPO_ID,
)
from chatterbox.engine import EngineConfig
from chatterbox.hub import DEFAULT_TINY_CACHE_DIR
from serve_app.jobs.config import JobsConfig

# Chunks of one request in flight on a CPU replica: the only cap that keeps a one-chunk request
# behind a 40-chunk one within 2x of its solo latency (bench/chunk_cap.py, tiny CPU profile: 1.7-1.8x
# with 1, 2.3x with 2, 4.0-5.7x with all 8 slots). Filling the slots with one request's chunks
# lowers latency under load (p50 0.66-0.84x with 8), at that cost in fairness.
CPU_CHUNKS_IN_FLIGHT = 1
MAX_TAG_CHARS = 64  # longest `[tag]` the chunker keeps whole, so a chunk limit must exceed it
ENGINE_DEFAULTS = EngineConfig()
# The slots of each model replica's engine (EngineConfig.max_slots): the most chunks decoding at once.
MaxBatchSize = Annotated[int, Field(ge=1, le=256)]
# EngineConfig fields that AppArgs sets from its own top-level fields, so each is set in one place.
_ENGINE_FIELDS_FROM_ARGS = {"max_slots": "max_batch_size", "prefix_cache_voices": "voice_cache_size"}


class StrictConfig(BaseModel):
    """Unknown keys are refused and a config never changes once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(StrictConfig):
    """The model replicas' `user_config`: the slots of their engine's KV cache. A change rebuilds each
    replica's engine once it is idle (TurboModel.reconfigure)."""

    max_batch_size: MaxBatchSize


class AutoscalingSettings(StrictConfig):
    """Replica range of the model deployment (min == max: a fixed count)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # Chunks in flight per replica that Serve aims for; None: the batch size (one full batch queued).
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self


class ChunkingConfig(StrictConfig):
    """How the ingress splits long text (sentences, then clauses, then words)."""

    # 300 characters are ~20 s of speech at the usual 15 characters a second: under the 25-30 s and
    # ~350 characters past which users of the real model report drift and hallucination, and the
    # engine's token cap bounds a chunk that misses its STOP.
    max_chunk_chars: int = Field(300, gt=MAX_TAG_CHARS, le=4000)


class StitchingConfig(StrictConfig):
    """How chunk audio is joined: chunk i+1 starts `pause - crossfade` after chunk i ends."""

    crossfade_ms: float = Field(10.0, ge=0.0, le=200.0)
    sentence_pause_ms: float = Field(80.0, ge=0.0, le=5000.0)  # chunk ends a sentence
    paragraph_pause_ms: float = Field(600.0, ge=0.0, le=5000.0)  # chunk ends a paragraph
    # A chunk that ends mid-sentence (clause or word split) gets no pause, only the crossfade.


class LimitsConfig(StrictConfig):
    """Request limits enforced by the ingress before any model work."""

    max_text_chars: int = Field(20_000, ge=1)
    max_reference_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Longer references are refused; a voice needs more than MIN_REFERENCE_SECONDS, so a bound at
    # or below it would refuse every voice.
    max_reference_seconds: float = Field(MAX_REFERENCE_SECONDS, gt=MIN_REFERENCE_SECONDS)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # whole HTTP body (base64 adds 4/3)
    # Requests one ingress replica works on at once; beyond it, 503 `overloaded` at once, in our JSON
    # shape with Retry-After. Below `ingress.max_ongoing_requests`: the slots above it are where the
    # ingress answers its refusals, so Serve never holds a request back (or refuses it in plain text).
    max_active_requests: int = Field(192, ge=1)
    retry_after_s: int = Field(2, ge=1)  # the Retry-After header of every 503 and 429


class FrontDeploymentConfig(StrictConfig):
    """Ingress or stitcher: CPU-only deployments with a fixed replica count."""

    num_replicas: int = Field(1, ge=1)
    # Half a CPU by default, so a 2-core machine fits one CPU model replica beside both.
    num_cpus: float = Field(0.5, ge=0)
    # Each user request holds one slot for its whole life (chunks + stitching).
    max_ongoing_requests: int = Field(256, ge=1)


class ShutdownConfig(StrictConfig):
    """Serve's graceful-shutdown settings for every deployment (tests shorten them)."""

    graceful_shutdown_wait_loop_s: float = Field(2.0, ge=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)


class IngressConfig(FrontDeploymentConfig):
    """The ingress, which admits user requests: `limits.max_active_requests` run at once per replica,
    the rest of its `max_ongoing_requests` are refused at once in our JSON shape. Serve queues callers
    beyond `max_ongoing_requests` (at the HTTP proxy or a handle) only for the moment a refusal takes,
    so by default its queue has no limit (-1): a limit would make Serve itself refuse a burst, over
    HTTP with a plain-text 503 that has no Retry-After."""

    max_queued_requests: int = Field(-1, ge=-1)

    @model_validator(mode="after")
    def _check_queue(self) -> IngressConfig:
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or positive")
        return self


def front_deployment_options(
    name: str, front: FrontDeploymentConfig, shutdown: ShutdownConfig
) -> dict[str, Any]:
    """Serve options of the ingress or the stitcher."""
    return {
        "name": name,
        "num_replicas": front.num_replicas,
        "max_ongoing_requests": front.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": front.num_cpus},
        **shutdown.model_dump(),
    }


class VoicesConfig(StrictConfig):
    """Saved voices (serve_app.voices.store): one directory every ingress and model replica reads,
    so in a cluster a volume all their nodes mount (cluster/rayservice.yaml: /mnt/voices)."""

    store_dir: str = f"{DEFAULT_TINY_CACHE_DIR}/voices"
    max_voices: int = Field(1000, ge=1, le=100_000)


class AuthConfig(StrictConfig):
    """API keys of the HTTP API (serve_app.api.auth). With none here and no file named by the
    CHATTERBOX_API_KEYS_FILE environment variable of the ingress replicas, the API is open.

    The keys are checked where they are loaded (`serve_app.api.auth.load_api_keys`): a validation error
    here would print the refused key.
    """

    api_keys: tuple[SecretStr, ...] = ()


class AppArgs(StrictConfig):
    """Everything `build_app` needs; every field has a production default."""

    # Model source (chatterbox.hub.resolve_model): "tiny" (a seeded random checkpoint built locally:
    # an offline trial that speaks noise), an existing local checkpoint directory, or a hub repo id.
    model: str = TURBO_REPO_ID
    revision: str | None = None
    tiny_cache_dir: str = DEFAULT_TINY_CACHE_DIR
    # "auto": request `num_gpus` per replica when Ray (or, before Ray starts, torch) sees a GPU, and
    # run on CUDA when Ray assigned the replica one. Name "cuda" on clusters that add GPU nodes on
    # demand: none is visible when the application is built.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    num_gpus: float = Field(1.0, gt=0, le=1)  # GPU share of one model replica when on CUDA
    model_num_cpus: float = Field(1.0, ge=0)
    # KV-cache slots of each model replica's engine: sets `engine.max_slots` (the engine's default).
    max_batch_size: MaxBatchSize = ENGINE_DEFAULTS.max_slots
    # Chunks one model replica accepts at once; None: twice the batch size (as many again queued).
    model_max_ongoing_requests: int | None = Field(None, ge=1)
    # Chunks of one request sent to the model at once (the next as an earlier one finishes); None:
    # the batch size on GPU replicas, CPU_CHUNKS_IN_FLIGHT on CPU ones. More lets one long text fill
    # more of the replicas' batches, and hold short requests back longer.
    max_chunks_in_flight: int | None = Field(None, ge=1)
    # Prepared voices kept per model replica, and voices whose prompt K/V its engine keeps (sets
    # `engine.prefix_cache_voices`).
    voice_cache_size: int = Field(64, ge=1)
    # Route each voice's chunks to the model replica that holds it (serve_app.deployments.routing),
    # falling back to the least-loaded replica when that one has a full batch ongoing; off: Serve's
    # default router, which spreads chunks regardless of voice.
    voice_affinity: bool = False
    # Speech tokens per chunk at most (25 per second); the model stops by itself before that.
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)
    watermark: bool = True
    # The replicas' TurboEngine, as the engine defines it (its defaults); its `max_slots` and
    # `prefix_cache_voices` are max_batch_size and voice_cache_size above (`_engine_follows_args`).
    engine: EngineConfig = ENGINE_DEFAULTS
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    chunking: ChunkingConfig = ChunkingConfig()
    stitching: StitchingConfig = StitchingConfig()
    limits: LimitsConfig = LimitsConfig()
    ingress: IngressConfig = IngressConfig()
    stitcher: FrontDeploymentConfig = FrontDeploymentConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    voices: VoicesConfig = VoicesConfig()
    auth: AuthConfig = AuthConfig()
    jobs: JobsConfig = JobsConfig()  # durable jobs (serve_app.jobs.config)

    @model_validator(mode="before")
    @classmethod
    def _engine_follows_args(cls, data: Any) -> Any:
        """`engine.max_slots` and `engine.prefix_cache_voices` come from their top-level fields."""
        if not isinstance(data, dict):
            return data
        engine = data.get("engine", {})
        engine = dict(asdict(engine) if isinstance(engine, EngineConfig) else engine)
        fields = cls.model_fields
        for name, source in _ENGINE_FIELDS_FROM_ARGS.items():
            given = engine.pop(name, None)
            value = data.get(source, fields[source].default)
            if given is not None and given != value:
                raise ValueError(f"engine.{name}: set {source} instead")
            engine[name] = value
        return {**data, "engine": engine}

    @model_validator(mode="after")
    def _check_ongoing(self) -> AppArgs:
        if (
            self.model_max_ongoing_requests is not None
            and self.model_max_ongoing_requests < self.max_batch_size
        ):
            raise ValueError(
                f"model_max_ongoing_requests ({self.model_max_ongoing_requests}) must be at least "
                f"max_batch_size ({self.max_batch_size}), or the engine's slots can never fill"
            )
        return self

    @model_validator(mode="after")
    def _check_admission(self) -> AppArgs:
        active = self.limits.max_active_requests
        if active >= self.ingress.max_ongoing_requests:
            raise ValueError(
                f"limits.max_active_requests ({active}) must be below ingress.max_ongoing_requests "
                f"({self.ingress.max_ongoing_requests}): Serve would queue requests before the ingress "
                "could refuse them"
            )
        return self

    def chunks_in_flight(self, on_gpu: bool) -> int:
        if self.max_chunks_in_flight is not None:
            return self.max_chunks_in_flight
        return self.max_batch_size if on_gpu else CPU_CHUNKS_IN_FLIGHT

    @property
    def batching(self) -> BatchingConfig:
        return BatchingConfig(max_batch_size=self.max_batch_size)

    @property
    def model_max_ongoing(self) -> int:
        """Chunks one model replica accepts at once (Serve's `max_ongoing_requests` of TurboModel)."""
        return self.model_max_ongoing_requests or 2 * self.max_batch_size
