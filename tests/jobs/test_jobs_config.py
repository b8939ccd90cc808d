"""Jobs configuration without Ray: the Celery adapter's settings, and the cluster README's block."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_deployments
from ray.serve.config import AutoscalingConfig

from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.deployments.jobs import QUEUE_LENGTH_POLICY, Jobs
from serve_app.jobs.broker import (
    RUN_JOB_TASK,
    jobs_root,
    make_dirs,
    requeue_interrupted,
    task_processor_config,
)
from serve_app.jobs.records import JobRecord, new_job_id
from serve_app.jobs.store import JobStore

ROOT = Path(__file__).resolve().parents[2]


def cluster_jobs_block() -> dict:
    readme = (ROOT / "cluster" / "README.md").read_text()
    section = readme[readme.index("### Durable jobs") :]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S)[1])["jobs"]


def test_the_cluster_block_builds_an_app_with_autoscaled_consumers():
    args = AppArgs(device="cuda", jobs=cluster_jobs_block())
    application = call_user_app_builder_with_args_if_necessary(
        build_app, {"device": "cuda", "jobs": cluster_jobs_block()}
    )
    built = build_deployments(application, name="tts")
    assert {d.name for d in built.deployments} == {"Ingress", "TurboModel", "Stitcher", "Jobs"}
    options = Jobs.get_deployment_options(args)
    scaling = AutoscalingConfig(**options["autoscaling_config"])
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 4)
    assert options["autoscaling_config"]["policy"]["policy_function"] == QUEUE_LENGTH_POLICY
    assert options["autoscaling_config"]["policy"]["policy_kwargs"] == {
        "broker_url": "redis://chatterbox-redis:6379/0",
        "queue_name": "chatterbox-jobs",
    }


def test_adapter_settings_follow_the_config(tmp_path):
    redis = task_processor_config(
        AppArgs(jobs={"broker_url": "redis://r:1/0", "visibility_timeout_s": 90}).jobs
    )
    assert redis.adapter_config.broker_url == redis.adapter_config.backend_url == "redis://r:1/0"
    assert redis.adapter_config.broker_transport_options == {"visibility_timeout": 90}
    assert redis.failed_task_queue_name == "chatterbox-jobs-failed"
    embedded = task_processor_config(AppArgs(jobs={"dir": str(tmp_path)}).jobs)
    assert embedded.adapter_config.broker_url == "filesystem://"
    assert embedded.adapter_config.backend_url == f"file://{tmp_path}/results"
    options = embedded.adapter_config.broker_transport_options
    # Every folder of the filesystem transport under the jobs directory (kombu's control/ too).
    assert {k: v for k, v in options.items() if k.endswith("folder") or "folder_" in k} == {
        "data_folder_in": f"{tmp_path}/broker/queue",
        "data_folder_out": f"{tmp_path}/broker/queue",
        "processed_folder": f"{tmp_path}/broker/processed",
        "control_folder": f"{tmp_path}/broker/control",
    }


def test_autoscaled_consumers_need_redis_and_leases_lapse_before_redelivery():
    with pytest.raises(ValidationError, match="set broker_url"):
        AppArgs(jobs={"consumer": {"max_replicas": 3}})
    with pytest.raises(ValidationError, match="lease_s must be below"):
        AppArgs(jobs={"lease_s": 60, "visibility_timeout_s": 30})


def test_the_filesystem_broker_gets_a_dead_consumers_jobs_again(tmp_path):
    """kombu's filesystem transport deletes a message as it hands it out: the jobs a dead consumer
    held are queued again (real broker files), the queued and finished ones are not."""
    jobs = AppArgs(jobs={"dir": str(tmp_path)}).jobs
    make_dirs(jobs)
    store = JobStore(jobs_root(jobs), jobs.retention_s)
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids:
        store.create(JobRecord(id=job_id, format="wav", chunks_total=2, created_at=time.time()), {}, None)
    queued, running, finished = ids
    store.acquire_lease(running, "dead-run", lease_s=60)
    store.acquire_lease(finished, "run", lease_s=60)
    store.finish(finished, "run", lambda r: r.model_copy(update={"status": "completed"}), {})

    assert requeue_interrupted(jobs, store) == [running]
    assert store.get(queued).status == "queued"  # its own message is still in the queue
    messages = [json.loads(path.read_bytes()) for path in (tmp_path / "broker" / "queue").iterdir()]
    assert [message["headers"]["id"] for message in messages] == [running]
    assert messages[0]["headers"]["task"] == RUN_JOB_TASK
    redis = AppArgs(jobs={"dir": str(tmp_path), "broker_url": "redis://127.0.0.1:1/0"}).jobs
    assert requeue_interrupted(redis, store) == []  # Celery redelivers from Redis itself
