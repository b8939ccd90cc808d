"""TurboModel deployment: one TurboTTS per replica, batching chunk requests from all users.

Every chunk is one `synthesize_chunk` call; a `Batcher` gathers calls from every request into one
`TurboTTS.generate` batch, formed each time the model is free. Voices are prepared once per replica
and kept in its `VoiceCache`. Audio comes back unwatermarked: the
stitcher watermarks the joined audio once.

A failure in a batch stays with the chunks that cause it (`run_bisecting`); the rest of the batch
gets its audio. A CUDA error leaves the context unusable: the replica then refuses every chunk and
fails its health check, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from chatterbox.engine import TTSRequest, TurboTTS
from chatterbox.errors import TTSInputError
from chatterbox.hub import resolve_model
from chatterbox.voice import Voice
from serve_app.batcher import Batcher
from serve_app.config import AppArgs, BatchingConfig, ModelSource, replica_device
from serve_app.errors import ChunkOutOfMemoryError, ReplicaBrokenError
from serve_app.metrics import record_chunks_synthesised
from serve_app.schemas import ChunkJob, ModelInfo
from serve_app.voice_cache import VoiceCache

logger = logging.getLogger("ray.serve")

Item = TypeVar("Item")
Out = TypeVar("Out")


# torch >= 2.8 raises accelerator faults as AcceleratorError; older releases as a RuntimeError
# whose message names the CUDA error (the message test below covers those).
_ACCELERATOR_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in (getattr(torch, "AcceleratorError", None),) if error is not None
)


def is_cuda_error(error: BaseException) -> bool:
    """An accelerator error after which the CUDA context is unusable (out-of-memory is not one)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(error, _ACCELERATOR_ERRORS) or "CUDA error" in str(error)


def _detached(error: Exception) -> Exception:
    """error without its traceback or chained exceptions, whose frames would keep tensors alive."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)


def run_bisecting(fn: Callable[[list[Item]], Sequence[Out]], items: list[Item]) -> list[Out | Exception]:
    """`fn(items)`, split up on failure until only the items that cause it fail.

    Returns one outcome per item: fn's result, or the exception that item alone raises
    (ChunkOutOfMemoryError when it does not fit in accelerator memory even alone). Out-of-memory
    and bad input halve the batch; any other error retries the items one by one. Only a CUDA error
    propagates: the context is unusable, so no retry can succeed.
    """
    if not items:
        return []
    try:
        return list(fn(items))
    except torch.cuda.OutOfMemoryError:
        failure: Exception | None = None  # out of memory; keep nothing that holds the failed attempt
    except TTSInputError as error:
        failure = _detached(error)
    except Exception as error:
        if is_cuda_error(error):
            raise
        logger.warning("a batch of %d items failed", len(items), exc_info=True)
        failure = _detached(error)
    # Out of the handler: the exception, its traceback and the frames holding the failed attempt's
    # activations and KV cache are gone (gc for reference cycles), so the retry has that memory.
    half = len(items) // 2
    if failure is None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            return [
                ChunkOutOfMemoryError(
                    "a chunk does not fit in accelerator memory even alone; lower "
                    "chunking.max_chunk_chars or give each model replica more memory"
                )
            ]
        logger.warning(
            "CUDA out of memory at batch size %d; retrying as %d + %d", len(items), half, len(items) - half
        )
    elif len(items) == 1:
        return [failure]
    elif not isinstance(failure, TTSInputError):
        return [outcome for item in items for outcome in run_bisecting(fn, [item])]
    return run_bisecting(fn, items[:half]) + run_bisecting(fn, items[half:])


def replica_max_ongoing_requests() -> int | None:
    """The running replica's `max_ongoing_requests` (None outside a Serve replica).

    Read from the replica context, not passed in at build time, so that a config file's override of
    the deployment's `max_ongoing_requests` counts too (Ray 2.60 exposes it only privately).
    """
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return None
    return context._deployment_config.max_ongoing_requests


@dataclass(frozen=True)
class ReplicaStats:
    """Counters of one replica since it started, and its current batch size."""

    batches_run: int
    items_run: int
    items_cancelled: int  # dropped before their batch formed: their request was cancelled
    max_batch_size_seen: int
    voices_prepared: int
    max_batch_size: int


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
            "max_ongoing_requests": args.model_max_ongoing_requests or 2 * args.max_batch_size,
            "ray_actor_options": {"num_cpus": args.model_num_cpus, "num_gpus": num_gpus},
            "user_config": args.batching.model_dump(),
            **args.shutdown.model_dump(),
        }

    async def __init__(self, source: ModelSource, voice_cache_size: int) -> None:
        device = replica_device(source.device, ray.get_gpu_ids())
        checkpoint = await asyncio.to_thread(
            resolve_model, source.model, source.revision, source.tiny_cache_dir
        )
        dtype = getattr(torch, source.dtype) if source.dtype else None
        self._tts = await asyncio.to_thread(TurboTTS.from_checkpoint, checkpoint, device, dtype)
        self._voices = VoiceCache(
            voice_cache_size,
            voice_id=self._tts.voice_id,
            prepare=lambda clips: self._run_on_model(self._tts.prepare_voices, clips),
        )
        batching = BatchingConfig()  # reconfigure() applies the deployment's user_config
        self._batcher: Batcher[ChunkJob, np.ndarray] = Batcher(
            self._run_batch,
            owner=lambda job: job.request_id,
            max_batch_size=batching.max_batch_size,
            wait_s=batching.batch_wait_timeout_s,
        )
        self._broken: str | None = None
        self._batches_run = 0
        self._items_run = 0
        self._max_batch_size_seen = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        batching = BatchingConfig.model_validate(user_config)
        batch_size = batching.max_batch_size
        # The replica never holds more chunk calls than this, so a larger batch could never fill
        # (Serve updates the limit after calling reconfigure: a change of both at once sees the old one).
        limit = replica_max_ongoing_requests()
        if limit is not None and batch_size > limit:
            logger.warning(
                "max_batch_size %d exceeds max_ongoing_requests %d; using %d", batch_size, limit, limit
            )
            batch_size = limit
        self._batcher.max_batch_size = batch_size
        self._batcher.wait_s = batching.batch_wait_timeout_s

    def check_health(self) -> None:
        if self._broken is not None:
            raise ReplicaBrokenError(f"TurboModel replica is broken: {self._broken}")

    async def info(self) -> ModelInfo:
        return ModelInfo(sample_rate=self._tts.sample_rate, max_text_tokens=self._tts.max_text_tokens)

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(
            batches_run=self._batches_run,
            items_run=self._items_run,
            items_cancelled=self._batcher.dropped,
            max_batch_size_seen=self._max_batch_size_seen,
            voices_prepared=self._voices.prepared,
            max_batch_size=self._batcher.max_batch_size,
        )

    async def synthesize_chunk(self, job: ChunkJob) -> np.ndarray:
        """(T,) float32 audio at the model's sample rate, unwatermarked."""
        self.check_health()  # fail fast instead of queueing on a replica that can run nothing
        outcome = await self._batcher.submit(job)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _run_batch(self, jobs: list[ChunkJob]) -> list[np.ndarray | BaseException]:
        """One outcome per job: its audio, or the exception that job alone should raise."""
        self._batches_run += 1
        self._items_run += len(jobs)
        self._max_batch_size_seen = max(self._max_batch_size_seen, len(jobs))
        shared = iter(await self._voices.resolve([job.voice for job in jobs if job.voice is not None]))
        default = self._tts.default_voice
        voices = [default if job.voice is None else next(shared) for job in jobs]
        runnable = [i for i, v in enumerate(voices) if isinstance(v, Voice)]
        requests = [TTSRequest(jobs[i].text, voices[i], jobs[i].sampling) for i in runnable]
        started_at = time.monotonic()
        audio = await self._run_on_model(self._generate, requests)
        record_chunks_synthesised(
            [len(wav) / self._tts.sample_rate for wav in audio if isinstance(wav, np.ndarray)],
            time.monotonic() - started_at,
        )
        audio_by_job = dict(zip(runnable, audio, strict=True))
        return [audio_by_job.get(i, voice) for i, voice in enumerate(voices)]  # voice: its error

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

    def _generate(self, requests: list[TTSRequest]) -> list[np.ndarray]:
        return self._tts.generate(requests, watermark=False)
