"""A model replica after a CUDA error: it fails the chunks in its engine as retryable, refuses
further work at once and fails its health check, so Serve replaces it.

A CPU cannot raise a CUDA error on purpose, so the replica runs in this process on the session's Ray
(which `ray.get_gpu_ids()` in the replica's constructor would otherwise start by itself), and a
forward hook on T3's speech head raises the error torch gives for an illegal memory access while
the fault is on: the real engine meets it inside its prefill and decode steps.
"""

import asyncio

import numpy as np
import pytest
import torch

from chatterbox.engine import EngineConfig
from chatterbox.sampling import SamplingParams
from serve_app.deployments.args import ModelArgs, ModelSource
from serve_app.deployments.model import TurboModel
from serve_app.errors import ReplicaBrokenError, model_error
from serve_app.schemas import ChunkJob, ReplicaStats


def job(text: str) -> ChunkJob:
    return ChunkJob(request_id=text, text=text, voice=None, sampling=SamplingParams(seed=1, max_new_tokens=5))


def test_a_cuda_error_breaks_the_replica(serve_app):
    fault = {"on": False}

    def illegal_memory_access(module: torch.nn.Module, args: tuple) -> None:
        if fault["on"]:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    async def scenario() -> tuple[object, list, list, ReplicaStats, TurboModel]:
        model = TurboModel.__new__(TurboModel)
        await model.__init__(
            ModelArgs(
                source=ModelSource.from_args(serve_app.args),
                engine=EngineConfig(max_slots=4),
                voice_cache_size=2,
            )
        )
        model._tts.t3.speech_head.register_forward_pre_hook(illegal_memory_access)
        healthy = await model.synthesize_chunk(job("Before the fault."))
        model.check_health()
        fault["on"] = True
        # Two chunks in the engine at once: the one the fault hits first and another one.
        in_engine = await asyncio.gather(
            model.synthesize_chunk(job("Hit by the fault.")),
            model.synthesize_chunk(job("Beside it.")),
            return_exceptions=True,
        )
        later = await asyncio.gather(model.synthesize_chunk(job("After the fault.")), return_exceptions=True)
        stats = await model.stats()
        for _ in range(100):  # the engine counts a failure just after handing it to its caller
            if stats.engine.requests_failed == 2:
                break
            await asyncio.sleep(0.01)
            stats = await model.stats()
        model.__del__()  # what Serve calls when it stops the replica
        return healthy, in_engine, later, stats, model

    healthy, in_engine, later, stats, model = asyncio.run(scenario())
    assert isinstance(healthy, np.ndarray) and len(healthy) > 0
    assert all(isinstance(outcome, ReplicaBrokenError) for outcome in in_engine + later), in_engine + later
    assert "illegal memory access" in str(in_engine[1])
    with pytest.raises(ReplicaBrokenError):
        model.check_health()
    # The chunk after the fault was refused at once: never taken, never in the engine.
    assert (stats.chunks_received, stats.chunks_submitted, stats.chunks_finished) == (3, 3, 1)
    assert stats.engine.requests_failed == 2
    error = model_error(in_engine[1])  # what the ingress answers the other chunk's client
    assert (error.status, error.code) == (503, "replica_unavailable")
