"""TurboModel's batch splitting and retries, and the options the app builder gives each deployment
(no Ray started). Building the tiny checkpoint a replica loads is tested in tests/test_hub.py."""

import gc
import weakref

import pytest
import torch
import yaml
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.deployment import deployment_to_schema
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from chatterbox.errors import TTSInputError
from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.errors import ChunkOutOfMemoryError
from serve_app.model import is_cuda_error, run_bisecting


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


class FakeAccelerator:
    """Memory of `capacity` units, each block freed when nothing references it any more (as a CUDA
    tensor is), running out of memory like CUDA. Records the memory in use when each attempt starts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.in_use_at_start: list[int] = []

    def allocate(self, units: int) -> object:
        if self.in_use + units > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {units} more units, {self.in_use} in use")
        self.in_use += units
        block = object.__new__(type("Block", (), {}))
        weakref.finalize(block, self._free, units)
        return block

    def _free(self, units: int) -> None:
        self.in_use -= units


def generate_on(accelerator: FakeAccelerator, reraise_in_handler: bool):
    """A generate-like function: a KV cache of one unit per item, then activations as large again."""

    def generate(items: list[str]) -> list[str]:
        accelerator.in_use_at_start.append(accelerator.in_use)
        kv_cache = [accelerator.allocate(1) for _ in items]
        try:
            activations = accelerator.allocate(len(items))
        except torch.cuda.OutOfMemoryError as error:
            if not reraise_in_handler:
                raise
            # A local that outlives its handler (as in retry loops that keep the last error) makes
            # a reference cycle, frame -> error -> traceback -> frame, that only gc frees.
            last_error = error
            raise torch.cuda.OutOfMemoryError("while allocating activations") from last_error
        assert kv_cache and activations
        return [f"audio:{item}" for item in items]

    return generate


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
    assert model.user_config == {"max_batch_size": 12, "batch_wait_timeout_s": 0.02}
    assert model.max_ongoing_requests == 24  # one batch running, one queued
    assert model._deployment_config.autoscaling_config.target_ongoing_requests == 12
    assert deployments["Ingress"].max_ongoing_requests == 256
    assert deployments["Ingress"].max_queued_requests == 256  # a burst beyond this gets 503 at once
    assert deployments["Stitcher"].max_queued_requests == -1  # only the ingress admits requests
    assert deployments["Ingress"].init_args[-1] == 1  # chunks in flight per request on a CPU model


@pytest.mark.parametrize(
    ("device", "max_chunks_in_flight", "expected"), [("cuda", None, 12), ("cuda", 3, 3), ("cpu", 5, 5)]
)
def test_chunks_in_flight_per_request(device, max_chunks_in_flight, expected):
    args = AppArgs(device=device, max_batch_size=12, max_chunks_in_flight=max_chunks_in_flight)
    assert deployments_of(args)["Ingress"].init_args[-1] == expected


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
