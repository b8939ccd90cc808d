"""A model replica after a CUDA error: it fails its batch as retryable, refuses further work at once
and fails its health check, so Serve replaces it.

A CPU cannot raise a CUDA error on purpose, so a TurboModel whose generate raises the error torch
gives for an illegal memory access stands in, run in this process on the session's Ray (which
`ray.get_gpu_ids()` in the replica's constructor would otherwise start by itself).
"""

import asyncio

import numpy as np
import pytest
import torch

from chatterbox.engine import TTSRequest
from chatterbox.sampling import SamplingParams
from serve_app.config import ModelSource
from serve_app.errors import ReplicaBrokenError, model_error
from serve_app.model import ReplicaStats, TurboModel
from serve_app.schemas import ChunkJob

TRIGGER = "Trigger the fault."


class IllegalMemoryAccessModel(TurboModel):
    def _generate(self, requests: list[TTSRequest]) -> list[np.ndarray]:
        if any(request.text == TRIGGER for request in requests):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return super()._generate(requests)


def job(text: str) -> ChunkJob:
    return ChunkJob(request_id=text, text=text, voice=None, sampling=SamplingParams(seed=1, max_new_tokens=5))


def test_a_cuda_error_breaks_the_replica(serve_app):
    async def scenario() -> tuple[object, list, list, ReplicaStats, IllegalMemoryAccessModel]:
        model = IllegalMemoryAccessModel.__new__(IllegalMemoryAccessModel)
        await model.__init__(ModelSource.from_args(serve_app.args), voice_cache_size=2)
        healthy = await model.synthesize_chunk(job("Before the fault."))
        model.check_health()
        # One batch: the chunk that hits the fault and an innocent one beside it.
        in_batch = await asyncio.gather(
            model.synthesize_chunk(job(TRIGGER)),
            model.synthesize_chunk(job("Beside it.")),
            return_exceptions=True,
        )
        later = await asyncio.gather(model.synthesize_chunk(job("After the fault.")), return_exceptions=True)
        return healthy, in_batch, later, await model.stats(), model

    healthy, in_batch, later, stats, model = asyncio.run(scenario())
    assert isinstance(healthy, np.ndarray) and len(healthy) > 0
    assert all(isinstance(outcome, ReplicaBrokenError) for outcome in in_batch + later), in_batch + later
    assert "illegal memory access" in str(in_batch[1])
    with pytest.raises(ReplicaBrokenError):
        model.check_health()
    assert (stats.batches_run, stats.items_run) == (2, 3)  # the chunk after the fault never queued
    error = model_error(in_batch[1])  # what the ingress answers the innocent chunk's client
    assert (error.status, error.code) == (503, "replica_unavailable")
