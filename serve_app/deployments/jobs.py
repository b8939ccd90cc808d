"""`Jobs` consumer deployment: Serve's async inference (`@task_consumer`, bound in `build_app` with
the Celery adapter configured from `AppArgs.jobs`) runs each queued job through `JobRunner`.

The adapter calls task handlers on its Celery worker's threads, synchronously; each handler hands
its job to the replica's event loop, where the model and stitcher handles live, and waits for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve.handle import DeploymentHandle
from ray.serve.task_consumer import task_handler

from serve_app.config import AppArgs
from serve_app.deployments.args import IngressArgs
from serve_app.jobs.broker import RUN_JOB_TASK, jobs_root, make_dirs, requeue_interrupted
from serve_app.jobs.config import CONSUMER_DEPLOYMENT, JobsConfig
from serve_app.jobs.store import JobStore
from serve_app.synthesis.job_runner import JobRunner
from serve_app.synthesis.prepare import Preparer
from serve_app.voices.store import VoiceStore

QUEUE_LENGTH_POLICY = "ray.serve.async_inference_autoscaling_policy:AsyncInferenceAutoscalingPolicy"


class Jobs:
    @classmethod
    def get_deployment_options(cls, args: AppArgs) -> dict[str, Any]:
        jobs = args.jobs
        consumer = jobs.consumer
        options: dict[str, Any] = {"num_replicas": consumer.num_replicas}
        if consumer.autoscaled:
            policy = {"broker_url": jobs.broker_url, "queue_name": jobs.queue_name}
            options = {
                "autoscaling_config": {
                    "min_replicas": consumer.num_replicas,
                    "max_replicas": consumer.max_replicas,
                    "target_ongoing_requests": consumer.max_ongoing_requests,
                    "policy": {"policy_function": QUEUE_LENGTH_POLICY, "policy_kwargs": policy},
                }
            }
        return {
            "name": CONSUMER_DEPLOYMENT,
            **options,
            # Also the Celery worker's threads: the jobs one replica runs at once.
            "max_ongoing_requests": consumer.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": consumer.num_cpus},
            **args.shutdown.model_dump(),
        }

    def __init__(
        self, model: DeploymentHandle, stitcher: DeploymentHandle, config: IngressArgs, jobs: JobsConfig
    ) -> None:
        self._loop = asyncio.get_running_loop()  # Serve runs a constructor on the replica's event loop
        make_dirs(jobs)
        store = JobStore(jobs_root(jobs), jobs.retention_s)
        requeue_interrupted(jobs, store)
        preparer = Preparer(model, config, VoiceStore(config.voices.store_dir))
        in_flight = jobs.max_chunks_in_flight or config.max_chunks_in_flight
        self._runner = JobRunner(model, stitcher, preparer, store, jobs, in_flight)

    def check_health(self) -> None:
        """Fails once the adapter's Celery worker thread has stopped (the replica would take no more
        jobs), so Serve replaces the replica. `_adapter` is set by `@task_consumer` at start."""
        worker = getattr(getattr(self, "_adapter", None), "_worker_thread", None)
        if worker is not None and not worker.is_alive():
            raise RuntimeError("the Celery worker thread of this consumer stopped")

    @task_handler(name=RUN_JOB_TASK)
    def run_job(self, job_id: str) -> str:
        return asyncio.run_coroutine_threadsafe(self._runner.run(job_id), self._loop).result()
