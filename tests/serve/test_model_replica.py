"""TurboModel: its voice-preparation retries and the options the app builder gives each deployment
(no Ray started), then its engine on the session's real local Ray (tiny checkpoint, CPU): chunks
decoded together get their solo audio, cancellation reaches the engine, the slot count holds, and a
new slot count rebuilds the engine. Building the tiny checkpoint a replica loads is tested in
tests/test_hub.py."""

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import yaml
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.deployment import deployment_to_schema
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from chatterbox.engine import EngineCapacityError, EngineConfig
from chatterbox.engine.capacity import free_memory
from chatterbox.errors import TTSInputError
from chatterbox.hub import resolve_model
from chatterbox.sampling import SamplingParams
from chatterbox.tts import TTSRequest, TurboTTS
from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.deployments.args import ModelArgs, ModelSource
from serve_app.deployments.failures import is_cuda_error, run_bisecting
from serve_app.deployments.model import TurboModel
from serve_app.errors import ChunkOutOfMemoryError
from serve_app.schemas import ChunkJob, ReplicaStats
from tests.fake_accelerator import FakeAccelerator, generate_on
from tests.text_samples import SENTENCES as TEXT_SENTENCES


def fits_in_memory(max_batch: int, too_big: set[str]):
    """A generate-like function that runs out of CUDA memory above max_batch items or on a huge item."""
    calls: list[list[str]] = []

    def generate(items: list[str]) -> list[str]:
        calls.append(list(items))
        if len(items) > max_batch or too_big.intersection(items):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [f"audio:{item}" for item in items]

    return generate, calls


def test_out_of_memory_halves_the_batch_until_it_fits():
    generate, calls = fits_in_memory(max_batch=2, too_big=set())
    items = [f"c{i}" for i in range(8)]
    assert run_bisecting(generate, items) == [f"audio:c{i}" for i in range(8)]
    assert [len(c) for c in calls] == [8, 4, 2, 2, 4, 2, 2]


def test_only_a_chunk_that_never_fits_fails():
    generate, _ = fits_in_memory(max_batch=8, too_big={"c2"})
    outcomes = run_bisecting(generate, [f"c{i}" for i in range(5)])
    assert [o for i, o in enumerate(outcomes) if i != 2] == ["audio:c0", "audio:c1", "audio:c3", "audio:c4"]
    assert isinstance(outcomes[2], ChunkOutOfMemoryError)
    assert "even alone" in str(outcomes[2])


def test_a_bad_input_fails_alone():
    def generate(items: list[str]) -> list[str]:
        if "bad" in items:
            raise TTSInputError("text is empty", "text")
        return [item.upper() for item in items]

    outcomes = run_bisecting(generate, ["a", "bad", "c"])
    assert outcomes[0::2] == ["A", "C"]
    assert isinstance(outcomes[1], TTSInputError)


def test_any_other_error_is_retried_item_by_item_and_stays_with_its_item():
    calls: list[list[str]] = []

    def generate(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise KeyError("a bug that only this item triggers")
        return [item.upper() for item in items]

    outcomes = run_bisecting(generate, ["a", "bad", "c"])
    assert outcomes[0::2] == ["A", "C"]
    assert isinstance(outcomes[1], KeyError)
    assert outcomes[1].__traceback__ is None  # its frames (and their tensors) are not kept
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_a_cuda_error_propagates_without_retries():
    calls: list[list[str]] = []

    def generate(items: list[str]) -> list[str]:
        calls.append(list(items))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="CUDA error"):
        run_bisecting(generate, ["a", "b"])
    assert calls == [["a", "b"]]
    if hasattr(torch, "AcceleratorError"):  # torch >= 2.8; older releases raise the RuntimeError above
        assert is_cuda_error(torch.AcceleratorError("device-side assert triggered"))
    assert not is_cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))


@pytest.mark.parametrize("reraise_in_handler", [False, True], ids=["plain", "reference_cycle"])
def test_out_of_memory_retry_runs_after_the_failed_attempt_is_freed(reraise_in_handler):
    accelerator = FakeAccelerator(capacity=10)
    items = [f"c{i}" for i in range(8)]  # needs 16 units; halves need 8
    gc.disable()  # only run_bisecting may collect (as under memory pressure, nobody else does)
    try:
        outcomes = run_bisecting(generate_on(accelerator, reraise_in_handler), items)
    finally:
        gc.enable()
    assert outcomes == [f"audio:c{i}" for i in range(8)]
    assert accelerator.in_use_at_start == [0, 0, 0]  # the whole batch, then its two halves
    assert accelerator.in_use == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_memory_retry_on_cuda_gets_the_failed_attempts_memory_back():
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    free_bytes, _ = torch.cuda.mem_get_info()
    block_elements = int(free_bytes * 0.3) // 4  # float32: three blocks fit, four do not

    def generate(items: list[str]) -> list[int]:
        blocks = [torch.empty(block_elements, device="cuda") for _ in items]
        return [int(block.numel()) for block in blocks]

    outcomes = run_bisecting(generate, ["a", "b", "c", "d"])  # 1.2x the free memory; halves fit
    assert outcomes == [block_elements] * 4
    assert torch.cuda.memory_allocated() == baseline


def deployments_of(args: AppArgs) -> dict:
    built = build_serve_app(build_app(args), name="tts")
    return {d.name: d for d in built.deployments}


def test_app_graph_and_cpu_options():
    deployments = deployments_of(AppArgs(device="cpu", max_batch_size=12, model_num_cpus=3))
    assert set(deployments) == {"Ingress", "TurboModel", "Stitcher"}
    model = deployments["TurboModel"]
    assert model.ray_actor_options == {"num_cpus": 3, "num_gpus": 0.0}
    assert model.user_config == {"max_batch_size": 12}  # the engine's slots, live
    assert model.max_ongoing_requests == 24  # every slot busy, as many chunks again queued
    assert model._deployment_config.autoscaling_config.target_ongoing_requests == 12
    assert deployments["Ingress"].max_ongoing_requests == 256
    assert deployments["Ingress"].max_queued_requests == -1  # a burst gets the ingress's own 503 at once
    assert deployments["Stitcher"].max_queued_requests == -1  # only the ingress admits requests
    assert deployments["Ingress"].init_args[-1].max_chunks_in_flight == 1  # per request on a CPU model


@pytest.mark.parametrize(
    ("device", "max_chunks_in_flight", "expected"), [("cuda", None, 12), ("cuda", 3, 3), ("cpu", 5, 5)]
)
def test_chunks_in_flight_per_request(device, max_chunks_in_flight, expected):
    args = AppArgs(device=device, max_batch_size=12, max_chunks_in_flight=max_chunks_in_flight)
    assert deployments_of(args)["Ingress"].init_args[-1].max_chunks_in_flight == expected


def test_gpu_share_and_serve_build_output():
    args = AppArgs(device="cuda", num_gpus=0.25, autoscaling={"min_replicas": 1, "max_replicas": 4})
    deployments = deployments_of(args)
    assert deployments["TurboModel"].ray_actor_options["num_gpus"] == 0.25
    # what `serve build` writes for this app is a valid deploy config
    app_schema = ServeApplicationSchema(
        name="tts",
        route_prefix="/",
        import_path="serve_app.app:app",
        deployments=[deployment_to_schema(d) for d in deployments.values()],
    )
    config = {"applications": [app_schema.model_dump(exclude_unset=True)]}
    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(config)))


# ------------------------------------------------------------------- the engine, on a real local Ray

SENTENCES = [*TEXT_SENTENCES, "The evening ferry was late again."]


def chunk(request_id: str, text: str, seed: int, max_new_tokens: int) -> ChunkJob:
    return ChunkJob(
        request_id=request_id,
        text=text,
        voice=None,
        sampling=SamplingParams(seed=seed, max_new_tokens=max_new_tokens),
    )


def stats(serve_app) -> ReplicaStats:
    return serve_app.model.stats.remote().result()


def wait_until(condition: Callable[[ReplicaStats], bool], serve_app, timeout_s: float = 60.0) -> ReplicaStats:
    deadline = time.monotonic() + timeout_s
    while not condition(now := stats(serve_app)):
        assert time.monotonic() < deadline, now
        time.sleep(0.02)
    return now


def test_chunks_of_several_requests_decoded_together_get_their_solo_audio(serve_app):
    # Three requests of two chunks each, of different lengths; the second half arrives while the
    # first decodes, so rows join and leave the running decode at different steps.
    jobs = [chunk(f"request-{i % 3}", SENTENCES[i], seed=40 + i, max_new_tokens=20 + 8 * i) for i in range(6)]
    before = stats(serve_app)
    first = [serve_app.model.synthesize_chunk.remote(job) for job in jobs[:3]]
    wait_until(lambda s: s.engine.steps - before.engine.steps >= 5, serve_app)
    second = [serve_app.model.synthesize_chunk.remote(job) for job in jobs[3:]]
    audio = [response.result() for response in first + second]
    after = stats(serve_app)

    tts = TurboTTS.from_checkpoint(resolve_model("tiny", None, serve_app.args.tiny_cache_dir), "cpu")
    for job, wav in zip(jobs, audio, strict=True):
        alone = tts.generate([TTSRequest(job.text, None, job.sampling)], watermark=False)[0]
        assert wav.dtype == np.float32 and wav.shape == alone.shape, job.text
        np.testing.assert_allclose(wav, alone, rtol=0, atol=1e-5, err_msg=job.text)
    assert after.chunks_finished - before.chunks_finished == 6
    # They shared decode steps: more tokens were sampled than steps were run.
    steps = after.engine.steps - before.engine.steps
    assert after.engine.tokens_generated - before.engine.tokens_generated > steps


def test_a_cancelled_chunk_call_leaves_the_engine_at_its_next_step(serve_app):
    before = stats(serve_app)
    long = chunk("cancelled-request", SENTENCES[0], seed=1, max_new_tokens=1000)
    response = serve_app.model.synthesize_chunk.remote(long)
    decoding = wait_until(lambda s: s.engine.live_rows == 1, serve_app)
    response.cancel()  # what the ingress does when the chunk's client goes away
    after = wait_until(lambda s: s.engine.requests_cancelled > before.engine.requests_cancelled, serve_app)
    assert after.engine.live_rows == 0  # its slot is free again
    assert after.chunks_cancelled - before.chunks_cancelled == 1
    assert after.chunks_finished == before.chunks_finished
    # It stopped long before its 1000 tokens (on 2 cores the tiny model samples ~100 a second).
    assert after.engine.tokens_generated - decoding.engine.tokens_generated < 500


def test_no_more_chunks_decode_at_once_than_the_engine_has_slots(serve_app):
    slots = serve_app.args.max_batch_size
    # One call fewer than the replica takes at once (2 x slots), so the stats calls get in too.
    jobs = [chunk(f"burst-{i}", SENTENCES[i % 6], seed=i, max_new_tokens=60) for i in range(2 * slots - 1)]
    seen: list[ReplicaStats] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(stats(serve_app))

    with ThreadPoolExecutor(max_workers=1) as pool:
        watcher = pool.submit(watch)
        try:
            audio = [r.result() for r in [serve_app.model.synthesize_chunk.remote(job) for job in jobs]]
        finally:
            done.set()
        watcher.result()
    assert all(isinstance(wav, np.ndarray) and len(wav) > 0 for wav in audio)
    assert max(s.engine.live_rows for s in seen) == slots  # full, never over
    assert max(s.engine.queue_depth for s in seen) > 0  # the rest waited for a slot
    assert seen[-1].engine.peak_live_rows == slots


def test_a_new_slot_count_rebuilds_the_engine_once_its_chunks_finish(serve_app):
    batching = serve_app.args.batching
    before = stats(serve_app)
    response = serve_app.model.synthesize_chunk.remote(
        chunk("rebuild", SENTENCES[1], seed=3, max_new_tokens=150)
    )
    wait_until(lambda s: s.engine.live_rows == 1, serve_app)
    try:
        serve_app.model.reconfigure.remote({"max_batch_size": 2}).result()
        # The chunk in the old engine finished first, with its audio.
        assert isinstance(response.result(timeout_s=0), np.ndarray)
        rebuilt = stats(serve_app)
        assert rebuilt.max_batch_size == 2
        assert rebuilt.engine.cache_bytes * 4 == before.engine.cache_bytes  # 2 slots of 8
        assert rebuilt.engine.steps == 0  # a new engine
        wav = serve_app.model.synthesize_chunk.remote(
            chunk("after", SENTENCES[2], seed=4, max_new_tokens=20)
        ).result()
        assert len(wav) > 0
    finally:
        serve_app.model.reconfigure.remote(batching.model_dump()).result()
    assert stats(serve_app).engine.cache_bytes == before.engine.cache_bytes


def test_a_kv_cache_that_does_not_fit_fails_the_replica_start_naming_one_that_would(serve_app):
    # Far beyond any machine's memory, so the engine refuses before allocating anything. In this
    # process on the session's Ray, as Serve would construct it (outside Serve: no slot clamp).
    model = TurboModel.__new__(TurboModel)
    start = model.__init__(
        ModelArgs(
            source=ModelSource.from_args(serve_app.args),
            engine=EngineConfig(max_slots=10**6, max_positions=4000),
            voice_cache_size=2,
        )
    )
    with pytest.raises(EngineCapacityError, match=r"max_slots=\d+ \(at max_positions=4000\).* would fit"):
        asyncio.run(start)


def test_a_new_slot_count_that_does_not_fit_keeps_the_engine_it_has(serve_app):
    settings = EngineConfig(max_slots=1, max_positions=8000)
    asked = 256  # the most AppArgs allows: 256 x 8000 positions of the tiny T3, ~50 GB of float32

    async def scenario() -> tuple[ReplicaStats, np.ndarray, ReplicaStats]:
        model = TurboModel.__new__(TurboModel)
        await model.__init__(
            ModelArgs(source=ModelSource.from_args(serve_app.args), engine=settings, voice_cache_size=2)
        )
        try:
            before = await model.stats()
            needed = asked * before.engine.cache_bytes
            if needed < free_memory(torch.device("cpu")):  # what the engine checks against
                pytest.skip(f"this machine could hold a {needed / 2**30:.0f} GiB cache")
            with pytest.raises(EngineCapacityError, match=rf"max_slots={asked} .* would fit"):
                await model.reconfigure({"max_batch_size": asked})
            wav = await model.synthesize_chunk(chunk("still", SENTENCES[0], seed=1, max_new_tokens=10))
            return before, wav, await model.stats()
        finally:
            model.__del__()

    before, wav, after = asyncio.run(scenario())
    assert after.max_batch_size == 1 and after.engine.cache_bytes == before.engine.cache_bytes
    assert len(wav) > 0  # the engine it kept still serves
