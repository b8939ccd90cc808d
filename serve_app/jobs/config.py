"""Configuration of durable jobs (`AppArgs.jobs`): broker, store, limits, delivery, consumers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatterbox.hub import DEFAULT_TINY_CACHE_DIR

CONSUMER_DEPLOYMENT = "Jobs"  # the consumer deployment's name


class ConsumerConfig(BaseModel):
    """The `Jobs` consumer deployment (CPU only: it waits on the model replicas)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1)  # the minimum, when autoscaled
    # Above num_replicas: Serve scales consumers on the queue's length and their running jobs
    # (AsyncInferenceAutoscalingPolicy, which polls Redis; not the filesystem broker).
    max_replicas: int | None = Field(None, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    # Jobs one consumer replica runs at once (its Celery worker's threads); also the autoscaling target.
    max_ongoing_requests: int = Field(4, ge=1)

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.num_replicas


class JobsConfig(BaseModel):
    """Durable jobs. With no `broker_url` they use Celery's filesystem broker and file result backend
    under `dir`, which need no server but only work on one machine; a cluster names a Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Off by default: the consumer deployment is one more replica and broker connection at every
    # application start (measured in docs/benchmarks.md). On, with no broker_url, it needs nothing else.
    enabled: bool = False
    # Records, chunk checkpoints and results; in a cluster a volume every ingress and consumer mounts.
    dir: str = f"{DEFAULT_TINY_CACHE_DIR}/jobs"
    broker_url: str | None = None  # e.g. redis://redis:6379/0; None: the filesystem broker under `dir`
    backend_url: str | None = None  # None: the broker's Redis, or result files under `dir`
    queue_name: str = Field("chatterbox-jobs", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    max_text_chars: int = Field(200_000, ge=1)
    max_queued: int = Field(1000, ge=1)  # queued jobs beyond which a submit is refused (503)
    retention_s: float = Field(86_400.0, gt=0)  # a finished job's record and files, then deleted
    # Chunks of one job in flight at once; None: as for one request (`max_chunks_in_flight`).
    max_chunks_in_flight: int | None = Field(None, ge=1)
    chunk_retries: int = Field(3, ge=0)  # a failed chunk is sent again this often, then the job fails
    chunk_retry_delay_s: float = Field(2.0, ge=0)  # doubled after each retry
    # A running job holds a lease in the store, renewed every third of it: a redelivered job waits
    # while another run's lease is live, and takes over (resuming) once it lapses.
    lease_s: float = Field(30.0, gt=0)
    # Celery redelivers a task not acknowledged after this long (its consumer died): the bound on
    # how late a killed consumer's jobs resume. Longer than most jobs, or live ones are redelivered
    # (they then wait on the lease).
    visibility_timeout_s: float = Field(3600.0, gt=0)
    max_retries: int = Field(3, ge=0)  # Celery's retries of a task that raised (a store or bug error)
    # Hosts `output_url` and `webhook` may name (exact, lower case); none: both are refused.
    allowed_hosts: tuple[str, ...] = ()
    delivery_attempts: int = Field(3, ge=1)
    delivery_timeout_s: float = Field(30.0, gt=0)
    runsync_wait_s: float = Field(90.0, ge=0)  # how long `POST /v2/{id}/runsync` waits for the result
    consumer: ConsumerConfig = ConsumerConfig()

    @model_validator(mode="after")
    def _check(self) -> JobsConfig:
        if self.lease_s >= self.visibility_timeout_s:
            raise ValueError(
                "lease_s must be below visibility_timeout_s: a dead run's lease must lapse first"
            )
        if self.consumer.autoscaled and self.broker_url is None:
            raise ValueError(
                "consumer.max_replicas: autoscaling polls the broker's queue; set broker_url (Redis)"
            )
        return self
