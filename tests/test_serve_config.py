"""Serve configuration: AppArgs validation, placement rules, and every shipped config and manifest
checked against the schema that consumes it (pure; no Ray cluster, no model)."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from chatterbox.engine import EngineConfig
from serve_app.app import replica_num_gpus
from serve_app.config import AppArgs, BatchingConfig
from serve_app.deployments.model import replica_device

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
DEPLOYMENTS = {"Ingress", "TurboModel", "Stitcher"}


def test_defaults_are_production_defaults():
    args = AppArgs()
    assert args.model == "ResembleAI/chatterbox-turbo"
    assert args.device == "auto"
    assert args.watermark is True
    assert args.chunking.max_chunk_chars == 300
    assert args.batching == BatchingConfig(max_batch_size=8)
    assert args.engine == EngineConfig(max_slots=8, prefix_cache_voices=64)  # the engine's other defaults


def test_command_line_strings_are_coerced():
    # `serve run serve_app.app:build_app model=tiny num_gpus=0.5 ...` passes strings
    args = AppArgs.model_validate(
        {"model": "tiny", "num_gpus": "0.5", "max_batch_size": "16", "watermark": "false"}
    )
    assert (args.model, args.num_gpus, args.max_batch_size, args.watermark) == ("tiny", 0.5, 16, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_gpus": 0}, "num_gpus"),
        ({"num_gpus": 2}, "num_gpus"),
        ({"device": "tpu"}, "device"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 16, "model_max_ongoing_requests": 8}, "must be at least max_batch_size"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}}, "initial_replicas"),
        ({"chunking": {"max_chunk_chars": 64}}, "max_chunk_chars"),
        ({"ingress": {"max_queued_requests": 0}}, "max_queued_requests"),
        ({"limits": {"max_reference_seconds": 2}}, "max_reference_seconds"),
        # A voice needs more than 5 s: a 5 s bound would refuse every reference.
        ({"limits": {"max_reference_seconds": 5}}, "max_reference_seconds"),
        ({"max_batch_sise": 8}, "max_batch_sise"),  # typos are errors, not silently ignored
        ({"batch_wait_timeout_s": 0.02}, "batch_wait_timeout_s"),  # gone with the static batcher
        ({"engine": {"s3gen_max_batch": 0}}, "s3gen_max_batch"),
    ],
)
def test_bad_args_are_rejected(overrides, message):
    with pytest.raises(ValidationError, match=message):
        AppArgs.model_validate(overrides)


def test_reference_bound_just_above_the_voice_minimum_is_accepted():
    assert (
        AppArgs.model_validate({"limits": {"max_reference_seconds": 5.5}}).limits.max_reference_seconds == 5.5
    )


@pytest.mark.parametrize(
    ("device", "visible_gpus", "num_gpus"),
    [("auto", 0, 0.0), ("auto", 1, 0.5), ("auto", 8, 0.5), ("cuda", 0, 0.5), ("cpu", 4, 0.0)],
)
def test_replica_gpu_share_follows_visible_gpus(device, visible_gpus, num_gpus):
    assert replica_num_gpus(AppArgs(device=device, num_gpus=0.5), visible_gpus) == num_gpus


def test_replica_device_follows_assigned_gpus():
    assert replica_device("auto", []) == "cpu"
    assert replica_device("auto", [0]) == "cuda"
    assert replica_device("cuda", []) == "cuda"
    assert replica_device("cpu", [0]) == "cpu"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert len(config.applications) == 1
    app = config.applications[0]
    assert app.import_path in ("serve_app.app:app", "serve_app.app:build_app")
    if app.import_path == "serve_app.app:build_app":
        AppArgs.model_validate(app.args)  # what Serve will pass to build_app
    else:
        assert not app.args  # an Application takes no args
    for deployment in app.deployments:
        assert deployment.name in DEPLOYMENTS
        if deployment.name == "TurboModel" and "user_config" in deployment.model_fields_set:
            BatchingConfig.model_validate(deployment.user_config)


def test_gpu_profiles_ask_for_gpus():
    for name, share in [("gpu-24gb.yaml", 0.5), ("gpu-80gb.yaml", 0.25)]:
        args = AppArgs.model_validate(
            yaml.safe_load((ROOT / "configs" / name).read_text())["applications"][0]["args"]
        )
        assert (args.device, args.num_gpus) == ("cuda", share)
        assert args.autoscaling.max_replicas * share == 1  # the replicas fill exactly one GPU
    tuned = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["deployments"]
    model = next(d for d in tuned if d["name"] == "TurboModel")
    assert model["ray_actor_options"]["num_gpus"] == 1
    assert model["max_ongoing_requests"] >= model["user_config"]["max_batch_size"]


def test_cpu_tiny_profile_runs_offline_on_loopback():
    config = yaml.safe_load((ROOT / "configs" / "cpu-tiny.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert (args.model, args.device) == ("tiny", "cpu")
