"""The engine's vocoder stage (tiny checkpoint): a failed S3Gen batch is freed before its retry,
and every item still gets the audio it gets alone."""

from __future__ import annotations

import dataclasses
import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox.engine import StageTimes
from chatterbox.engine.vocoder import VocoderStage
from chatterbox.sampling import SamplingParams
from chatterbox.tts import Job, TTSRequest, TurboTTS
from tests.fake_accelerator import FakeAccelerator, generate_on

TOKENS = 12


@pytest.fixture(scope="module")
def tts(tiny_checkpoint: Path) -> TurboTTS:
    return TurboTTS.from_pretrained(local_dir=tiny_checkpoint, device="cpu")


@dataclasses.dataclass(eq=False)
class Item:
    job: Job
    cancelled: bool = False
    times: StageTimes = dataclasses.field(default_factory=lambda: StageTimes(submitted=0.0))


@pytest.mark.parametrize("reraise_in_handler", [False, True], ids=["plain", "reference_cycle"])
def test_a_failed_vocoder_batch_is_freed_before_its_retry(tts: TurboTTS, monkeypatch, reraise_in_handler):
    jobs = tts.jobs([TTSRequest(f"Item {i}.", sampling=SamplingParams(seed=i)) for i in range(8)])
    tokens = [torch.randint(0, 6561, (TOKENS,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    alone = [tts.vocode_jobs([job], [t])[0] for job, t in zip(jobs, tokens, strict=True)]
    accelerator = FakeAccelerator(capacity=10)  # 8 items need 16 units; halves need 8
    vocode_jobs = tts.vocode_jobs

    allocate = generate_on(accelerator, reraise_in_handler)  # a KV cache, then activations

    def on_accelerator(batch: list[Job], speech: list[torch.Tensor]) -> list[np.ndarray]:
        allocate(batch)
        return vocode_jobs(batch, speech)

    monkeypatch.setattr(tts, "vocode_jobs", on_accelerator)
    delivered: dict[int, object] = {}
    all_in = threading.Event()
    items = [Item(job) for job in jobs]

    def deliver(item: object, result: object) -> None:
        delivered[items.index(item)] = result
        if len(delivered) == len(items):
            all_in.set()

    stage = VocoderStage(tts, max_batch=8, deliver=deliver)
    for item, t in zip(items, tokens, strict=True):
        stage.vocode(item, t)  # all queued before the thread starts: one batch of 8
    gc.disable()  # only the stage may collect (as under memory pressure, nobody else does)
    try:
        stage.start()
        assert all_in.wait(120)
    finally:
        gc.enable()
        stage.close()
    assert accelerator.in_use_at_start == [0, 0, 0]  # the whole batch, then its two halves
    assert accelerator.in_use == 0
    for i, wav in enumerate(alone):
        result = delivered[i]
        assert isinstance(result, np.ndarray) and result.shape == wav.shape
        assert np.abs(result - wav).max() <= 1e-6
    assert stage.stats().batches == 2
