"""TurboModel deployment: one TurboTTS per replica, every chunk decoded by its TurboEngine.

Every chunk is one `synthesize_chunk` (or `stream_chunk`) call, submitted to the replica's
`TurboEngine` (chatterbox.engine): continuous batching over a fixed KV cache of
`max_batch_size` slots, so a chunk joins the running decode at the next step instead of waiting for
a batch to finish. Voices are prepared once per replica and kept in its `VoiceCache`; the engine
keeps the same number of voices' prompt K/V. Audio comes back unwatermarked: the stitcher
watermarks the joined audio once.

Every call into the engine (TurboEngine) is in this file. A failure stays with the
chunk that causes it (the engine fails only that chunk; voice preparation goes through
`run_bisecting`). A CUDA error leaves the context unusable: the replica then refuses every chunk and
fails its health check, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import ray
import torch
from ray.serve.config import RequestRouterConfig

from chatterbox.engine import EngineCapacityError, EngineConfig, TurboEngine
from chatterbox.hub import resolve_model
from chatterbox.tts import TTSRequest, TurboTTS
from serve_app.config import AppArgs, BatchingConfig
from serve_app.deployments.args import ModelArgs
from serve_app.deployments.failures import CHUNK_OUT_OF_MEMORY, Item, Out, is_cuda_error, run_bisecting
from serve_app.deployments.routing import VoiceAffinityRouter
from serve_app.errors import ChunkOutOfMemoryError, ReplicaBrokenError
from serve_app.metrics import record_chunk_synthesised, record_engine_stats
from serve_app.schemas import ChunkJob, ModelInfo, ReplicaStats
from serve_app.voices.cache import VoiceCache

logger = logging.getLogger("ray.serve")

ENGINE_METRICS_INTERVAL_S = 1.0  # how often the engine's gauges and counters are recorded


def replica_device(
    device: Literal["auto", "cuda", "cpu"], assigned_gpu_ids: Sequence[int | str]
) -> Literal["cuda", "cpu"]:
    """The torch device of a replica: "auto" follows the GPUs Ray actually assigned to it, so a
    config file that overrides `ray_actor_options.num_gpus` moves the model along with it."""
    if device == "auto":
        return "cuda" if assigned_gpu_ids else "cpu"
    return device


def voice_routing_options(args: AppArgs) -> dict[str, Any]:
    """The deployment's request router: by voice when `voice_affinity` is on (saturated, so
    spilling to another replica, once a full batch is ongoing); else Serve's default."""
    if not args.voice_affinity:
        return {}
    router = RequestRouterConfig(
        request_router_class=VoiceAffinityRouter,
        request_router_kwargs={"saturated_at": args.max_batch_size},
    )
    return {"request_router_config": router}


class TurboModel:
    @classmethod
    def get_deployment_options(cls, args: AppArgs, num_gpus: float) -> dict[str, Any]:
        autoscaling = args.autoscaling
        return {
            "name": cls.__name__,
            "autoscaling_config": {
                "min_replicas": autoscaling.min_replicas,
                "max_replicas": autoscaling.max_replicas,
                "initial_replicas": autoscaling.initial_replicas,
                "target_ongoing_requests": autoscaling.target_ongoing_requests or args.max_batch_size,
                "upscale_delay_s": autoscaling.upscale_delay_s,
                "downscale_delay_s": autoscaling.downscale_delay_s,
            },
            "max_ongoing_requests": args.model_max_ongoing,
            "ray_actor_options": {"num_cpus": args.model_num_cpus, "num_gpus": num_gpus},
            "user_config": args.batching.model_dump(),
            **args.shutdown.model_dump(),
            **voice_routing_options(args),
        }

    async def __init__(self, config: ModelArgs) -> None:
        source = config.source
        self._max_ongoing_requests = config.max_ongoing_requests
        device = replica_device(source.device, ray.get_gpu_ids())
        checkpoint = await asyncio.to_thread(
            resolve_model, source.model, source.revision, source.tiny_cache_dir
        )
        dtype = getattr(torch, source.dtype) if source.dtype else None
        self._tts = await asyncio.to_thread(TurboTTS.from_checkpoint, checkpoint, device, dtype)
        self._broken: str | None = None
        self._voices = VoiceCache(
            config.voice_cache_size,
            voice_id=self._tts.voice_id,
            prepare=lambda clips: self._run_on_model(self._tts.prepare_voices, clips),
        )
        self._engine_config = replace(config.engine, max_slots=self._slots(config.engine.max_slots))
        # A cache that does not fit fails the replica's start with EngineCapacityError, whose
        # message names a capacity that would.
        self._engine = await asyncio.to_thread(self._start_engine, self._engine_config)
        self._accepting = asyncio.Event()  # cleared while the engine is rebuilt
        self._accepting.set()
        self._in_engine = 0  # chunks submitted and not yet answered
        self._drained = asyncio.Event()  # set while no chunk is in the engine
        self._drained.set()
        self._reconfiguring = asyncio.Lock()
        self._chunks_received = self._chunks_submitted = self._chunks_finished = 0
        self._chunks_cancelled = 0
        self._recorded = self._engine.stats()  # the engine counters the metrics have so far
        self._metrics_task: asyncio.Task[None] | None = asyncio.create_task(self._record_engine_metrics())

    def __del__(self) -> None:
        """Serve's shutdown of this replica: stop the engine's threads."""
        task = getattr(self, "_metrics_task", None)
        if task is not None and not task.done():
            task.cancel()
        self._metrics_task = None
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    def _slots(self, max_batch_size: int) -> int:
        """The engine's slot count for `max_batch_size`: at most the deployment's
        `max_ongoing_requests` (known from the build, `ModelArgs`), since the replica never holds
        more chunk calls than that, so more slots could never fill."""
        limit = self._max_ongoing_requests
        if limit is not None and max_batch_size > limit:
            logger.warning(
                "max_batch_size %d exceeds max_ongoing_requests %d; using %d", max_batch_size, limit, limit
            )
            return limit
        return max_batch_size

    def _start_engine(self, config: EngineConfig) -> TurboEngine:
        engine = TurboEngine(self._tts, config)  # allocates the KV cache
        engine.start()
        capture_s = engine.graph_capture_s
        logger.info(
            "TurboEngine: %d slots, KV cache %.1f MiB %s, decode %s",
            config.max_slots,
            engine.cache_bytes / 2**20,
            engine.cache_dtype,
            "eager" if capture_s is None else f"as CUDA graphs (captured in {capture_s:.1f} s)",
        )
        return engine

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new slot count builds a new engine once the chunks in the current one have finished;
        chunk calls that arrive meanwhile wait for it. A cache that does not fit brings the old
        engine back and raises the EngineCapacityError (Serve then fails this replica's update)."""
        slots = self._slots(BatchingConfig.model_validate(user_config).max_batch_size)
        async with self._reconfiguring:
            if slots == self._engine_config.max_slots:
                return
            logger.info(
                "max_batch_size %d -> %d: rebuilding the engine once its %d chunks finish",
                self._engine_config.max_slots,
                slots,
                self._in_engine,
            )
            self._accepting.clear()
            try:
                await self._drained.wait()
                record_engine_stats(self._engine.stats(), self._recorded)
                await asyncio.to_thread(self._engine.close)
                config = replace(self._engine_config, max_slots=slots)
                try:
                    self._engine = await asyncio.to_thread(self._start_engine, config)
                except EngineCapacityError:
                    logger.exception("keeping %d slots", self._engine_config.max_slots)
                    self._engine = await asyncio.to_thread(self._start_engine, self._engine_config)
                    raise
                self._engine_config = config
            finally:
                self._recorded = self._engine.stats()
                self._accepting.set()

    def check_health(self) -> None:
        if self._broken is not None:
            raise ReplicaBrokenError(f"TurboModel replica is broken: {self._broken}")

    async def info(self) -> ModelInfo:
        return ModelInfo(sample_rate=self._tts.sample_rate, max_text_tokens=self._tts.max_text_tokens)

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(
            chunks_received=self._chunks_received,
            chunks_submitted=self._chunks_submitted,
            chunks_finished=self._chunks_finished,
            chunks_cancelled=self._chunks_cancelled,
            voices_prepared=self._voices.prepared,
            max_batch_size=self._engine_config.max_slots,
            engine=self._engine.stats(),
            streaming=self._engine.vocoder_stats(),
        )

    async def synthesize_chunk(self, job: ChunkJob) -> np.ndarray:
        """(T,) float32 audio at the model's sample rate, unwatermarked."""
        async with self._chunk_call(job) as request, self._engine_call() as engine:
            chunk_id, submitted_at = uuid.uuid4().hex, time.monotonic()
            # Cancelling this call (Serve does when its caller goes away) cancels the chunk in the
            # engine: submit frees its slot, or its place in the queue, at the engine's next step.
            audio = await engine.submit(request, request_id=chunk_id, watermark=False)
            self._record_chunk(engine, chunk_id, len(audio), submitted_at)
            return audio

    async def stream_chunk(self, job: ChunkJob) -> AsyncIterator[np.ndarray]:
        """The chunk's float32 audio in pieces as the engine decodes it, unwatermarked: token-level
        streaming (the first piece after ~19 decode steps and one small S3Gen pass); together the
        pieces are the chunk's audio. Call with `handle.options(stream=True)`."""
        chunk_id, submitted_at, samples = uuid.uuid4().hex, time.monotonic(), 0
        async with (
            self._chunk_call(job) as request,
            self._engine_call() as engine,
            contextlib.aclosing(engine.stream_audio(request, chunk_id)) as pieces,
        ):
            async for piece in pieces:
                samples += len(piece)
                yield piece
            self._record_chunk(engine, chunk_id, samples, submitted_at)

    def _record_chunk(self, engine: TurboEngine, chunk_id: str, samples: int, submitted_at: float) -> None:
        times = engine.stage_times(chunk_id)
        record_chunk_synthesised(
            audio_seconds=samples / self._tts.sample_rate,
            queue_seconds=times.admitted - times.submitted if times and times.admitted else None,
            engine_seconds=time.monotonic() - submitted_at,
        )

    @contextlib.asynccontextmanager
    async def _chunk_call(self, job: ChunkJob) -> AsyncIterator[TTSRequest]:
        """One chunk call, counted as received, then cancelled or finished; yields its request."""
        self.check_health()  # fail fast instead of queueing on a replica that can run nothing
        self._chunks_received += 1
        try:
            # The built-in voice, or the reference's (cached or prepared now).
            voice = self._tts.default_voice if job.voice is None else await self._voices.voice(job.voice)
            yield TTSRequest(job.text, voice, job.sampling)
        except asyncio.CancelledError:  # Serve cancels the call when its caller goes away
            self._chunks_cancelled += 1
            raise
        self._chunks_finished += 1

    @contextlib.asynccontextmanager
    async def _engine_call(self) -> AsyncIterator[TurboEngine]:
        """The engine for one chunk, which counts as in it until the block ends (a rebuild waits)."""
        await self._accepting.wait()
        self.check_health()  # the replica may have broken while this chunk waited
        self._in_engine += 1
        self._drained.clear()
        self._chunks_submitted += 1
        try:
            yield self._engine
        except Exception as error:
            raise self._chunk_error(error) from error
        finally:
            self._in_engine -= 1
            if not self._in_engine:
                self._drained.set()

    def _chunk_error(self, error: Exception) -> Exception:
        """What a chunk's caller gets for the engine's error: a CUDA error breaks this replica for good."""
        if is_cuda_error(error):
            if self._broken is None:
                logger.error("CUDA error; this replica is broken and will be replaced: %s", error)
                self._broken = str(error)
            return ReplicaBrokenError(f"TurboModel replica is broken: {self._broken}")
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return ChunkOutOfMemoryError(CHUNK_OUT_OF_MEMORY)
        return error

    async def _record_engine_metrics(self) -> None:
        while True:
            await asyncio.sleep(ENGINE_METRICS_INTERVAL_S)
            stats = self._engine.stats()
            record_engine_stats(stats, self._recorded)
            self._recorded = stats

    async def _run_on_model(
        self, fn: Callable[[list[Item]], Sequence[Out]], items: list[Item]
    ) -> list[Out | Exception]:
        """run_bisecting(fn, items) off the event loop; a CUDA error breaks this replica for good."""
        if self._broken is None:
            try:
                return await asyncio.to_thread(run_bisecting, fn, items)
            except Exception as error:  # only a CUDA error leaves run_bisecting
                logger.exception("CUDA error; this replica is broken and will be replaced")
                self._broken = str(error)
        return [ReplicaBrokenError(f"TurboModel replica is broken: {self._broken}") for _ in items]
