"""The Celery adapter configuration of Serve's async inference, from `JobsConfig`: Redis, or the
embedded filesystem broker and file result backend under the jobs directory."""

from __future__ import annotations

from pathlib import Path

from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import instantiate_adapter_from_config
from ray.serve.task_processor import CeleryTaskProcessorAdapter

from serve_app.jobs.config import JobsConfig
from serve_app.jobs.store import JobStore

RUN_JOB_TASK = "run_job"  # the consumer's one task handler; its only argument is the job id


def jobs_root(config: JobsConfig) -> Path:
    return Path(config.dir).expanduser()


def _filesystem_folders(root: Path) -> dict[str, Path]:
    """Folders of kombu's filesystem transport. `control_folder` too: kombu writes its broadcast
    messages to `control/` in the working directory otherwise."""
    broker = root / "broker"
    return {
        "data_folder_in": broker / "queue",
        "data_folder_out": broker / "queue",
        "processed_folder": broker / "processed",
        "control_folder": broker / "control",
    }


def make_dirs(config: JobsConfig) -> None:
    """Create the jobs directory, and the embedded broker's folders (in the replica that uses them)."""
    root = jobs_root(config)
    folders = [root / "jobs", root / "results"]
    if config.broker_url is None:
        folders += _filesystem_folders(root).values()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)


def task_processor_config(config: JobsConfig) -> TaskProcessorConfig:
    root = jobs_root(config)
    if config.broker_url is None:
        broker_url = "filesystem://"
        options = {name: str(path) for name, path in _filesystem_folders(root).items()}
        options["store_processed"] = False
        backend_url = config.backend_url or f"file://{root / 'results'}"
    else:
        broker_url, options = config.broker_url, {"visibility_timeout": config.visibility_timeout_s}
        backend_url = config.backend_url or config.broker_url
    adapter = CeleryAdapterConfig(
        broker_url=broker_url,
        backend_url=backend_url,
        broker_transport_options=options,
        # One task at a time per thread: a prefetched job would wait behind a long one.
        app_custom_config={"worker_prefetch_multiplier": 1, "result_expires": config.retention_s},
    )
    return TaskProcessorConfig(
        queue_name=config.queue_name,
        adapter_config=adapter,
        max_retries=config.max_retries,
        failed_task_queue_name=f"{config.queue_name}-failed",
        unprocessable_task_queue_name=f"{config.queue_name}-unprocessable",
    )


def enqueue_job(adapter: CeleryTaskProcessorAdapter, job_id: str) -> None:
    # The job id is the task id, so a redelivered task names its job.
    adapter.enqueue_task_sync(RUN_JOB_TASK, args=[job_id], task_id=job_id)


def producer(config: JobsConfig) -> CeleryTaskProcessorAdapter:
    """The adapter the ingress enqueues jobs with (connects on first use)."""
    adapter = instantiate_adapter_from_config(task_processor_config(config))
    assert isinstance(adapter, CeleryTaskProcessorAdapter)
    return adapter


def requeue_interrupted(config: JobsConfig, store: JobStore) -> list[str]:
    """With the filesystem broker, queue again the jobs that a run started and did not finish or
    deliver; their ids. That transport deletes a message as it hands it out, so nothing else
    redelivers a dead consumer's jobs: a consumer replica calls this as it starts (a job that
    another live consumer still runs waits on its lease). Redis needs none: Celery redelivers."""
    if config.broker_url is not None:
        return []
    interrupted = store.interrupted()
    if interrupted:
        adapter = producer(config)
        for job_id in interrupted:
            enqueue_job(adapter, job_id)
    return interrupted
