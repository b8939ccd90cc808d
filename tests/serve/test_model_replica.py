"""TurboModel's batch halving, and the options the app builder gives each deployment (no Ray started)."""

import pytest
import torch
import yaml
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.deployment import deployment_to_schema
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from chatterbox.errors import TTSInputError
from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.model import run_bisecting
from serve_app.schemas import ChunkOutOfMemoryError


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


def test_other_errors_propagate():
    def generate(items: list[str]) -> list[str]:
        raise RuntimeError("kernel bug")

    with pytest.raises(RuntimeError, match="kernel bug"):
        run_bisecting(generate, ["a", "b"])


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
