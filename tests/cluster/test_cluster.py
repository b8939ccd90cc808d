"""The service on a real three-node Ray cluster (tests/cluster/conftest.py): deployed with the `serve`
CLI as operators do, then three faults under a steady bounded load, each measured. Every answer is
audio or our JSON 503 with Retry-After, never anything else; the saved voice and the job in flight
survive every fault; a lost model replica is replaced and serves again.

The faults run in this order on the one cluster; each leaves it whole (two live workers, two
running model replicas) for the next.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import soundfile as sf
import yaml

from serve_app.jobs.config import CONSUMER_DEPLOYMENT
from tests.cluster.conftest import APP_NAME, MODEL_DEPLOYMENT, Cluster
from tests.cluster.faults import RECORDS, FaultRecord, first_served_chunk
from tests.cluster.harness import RayNode, wait_until
from tests.cluster.load import AUDIO, OTHER, REFUSED, SteadyLoad, classify
from tests.serve.test_serve_app import paragraph

pytestmark = pytest.mark.cluster

FRONT_DEPLOYMENTS = ("Ingress", "Stitcher", CONSUMER_DEPLOYMENT)
WARMUP_S = 5.0  # steady load before the fault
TAIL_S = 5.0  # steady load after the service has recovered
LINK_CUT_S = 20.0
RECOVERY_TIMEOUT_S = 240.0
JOB_CHARS = 1500  # five or six chunks: still running when the fault strikes


def model_replicas(cluster: Cluster) -> list[dict]:
    return cluster.dashboard.running_replicas(APP_NAME, MODEL_DEPLOYMENT)


def test_serve_deploy_puts_model_replicas_on_the_worker_nodes(cluster, saved_voice):
    status = yaml.safe_load(cluster.serve("status").stdout)
    application = status["applications"][APP_NAME]
    assert application["status"] == "RUNNING"
    deployments = application["deployments"]
    assert set(deployments) == {MODEL_DEPLOYMENT, *FRONT_DEPLOYMENTS}
    assert all(d["status"] == "HEALTHY" for d in deployments.values()), deployments
    assert deployments[MODEL_DEPLOYMENT]["replica_states"] == {"RUNNING": 2}

    # Scheduled by resources: one model replica on each worker, the CPU deployments on the head.
    assert sorted(r["node_ip"] for r in model_replicas(cluster)) == sorted(w.address for w in cluster.workers)
    for name in FRONT_DEPLOYMENTS:
        nodes = {r["node_ip"] for r in cluster.dashboard.running_replicas(APP_NAME, name)}
        assert nodes == {cluster.head.address}, name

    response = httpx.post(
        f"{cluster.url}/v1/tts",
        json={"text": "Served across the cluster.", "voice": saved_voice["id"], "format": "wav"},
        timeout=120,
    )
    assert classify(response) == (AUDIO, "")
    # Saved on the shared directory, where every node finds it.
    assert saved_voice["id"] in {path.name for path in (cluster.shared_dir / "voices").iterdir()}


def voice_intact(cluster: Cluster, voice: dict) -> bool:
    listed = httpx.get(f"{cluster.url}/v1/voices", timeout=30).json()["data"]
    return voice in listed and httpx.get(f"{cluster.url}/v1/voices/{voice['id']}", timeout=30).json() == voice


def job_progress(cluster: Cluster, job_id: str) -> dict:
    return httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=30).json()


def job_outcome(cluster: Cluster, job_id: str, at_fault: dict) -> str:
    """The job's progress at the fault and how it ended; asserts it completed with its audio, every
    chunk checkpointed once on the shared directory."""
    final = wait_until(
        "the job finished",
        lambda: (
            (body := job_progress(cluster, job_id))["status"] in {"completed", "failed", "cancelled"} and body
        ),
        RECOVERY_TIMEOUT_S,
    )
    progress = at_fault["progress"]
    summary = (
        f"{at_fault['status']} {progress['chunks_done']}/{progress['chunks_total']} -> {final['status']}"
    )
    assert final["status"] == "completed", final
    audio = httpx.get(f"{cluster.url}/v1/jobs/{job_id}/audio", timeout=60)
    samples, _ = sf.read(io.BytesIO(audio.content), dtype="int16")
    assert audio.status_code == 200 and len(samples) > 0
    chunks = list((cluster.shared_dir / "jobs" / "jobs" / job_id / "chunks").iterdir())
    assert len(chunks) == final["progress"]["chunks_total"] == final["progress"]["chunks_done"]
    return summary


def replica_log(cluster: Cluster, replica: dict) -> Path:
    return cluster.node_at(replica["node_ip"]).logs() / replica["log_file_path"].lstrip("/")


def replacement_served(cluster: Cluster, before: set[str]) -> float | None:
    """When a model replica that is not one of ``before`` first answered a chunk (None: none did)."""
    served = [
        first_served_chunk(replica_log(cluster, r))
        for r in model_replicas(cluster)
        if r["replica_id"] not in before
    ]
    return min((t for t in served if t is not None), default=None)


def all_serving_since(cluster: Cluster, moment: float) -> float | None:
    """When the last of the two running model replicas answered its first chunk since ``moment``
    (None: not yet): the service is whole again."""
    replicas = model_replicas(cluster)
    served = [first_served_chunk(replica_log(cluster, r), since=moment) for r in replicas]
    if len(replicas) != 2 or None in served:
        return None
    return max(served)


def run_fault(cluster: Cluster, voice: dict, record: FaultRecord, inject: Callable[[], float]) -> None:
    """Steady load and a job in flight, then ``inject``, which returns when the fault ended; waits
    until every model replica answers chunks again, and for a little more steady load."""
    before = {r["replica_id"] for r in cluster.dashboard.replicas(APP_NAME, MODEL_DEPLOYMENT)}
    job = httpx.post(
        f"{cluster.url}/v1/jobs",
        json={"text": paragraph(JOB_CHARS, 3), "seed": 11, "format": "wav"},
        timeout=60,
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    load = SteadyLoad(cluster.url, voice["id"])
    load.start()
    try:
        time.sleep(WARMUP_S)
        at_fault = job_progress(cluster, job_id)
        fault_at = time.time()
        ended_at = inject()
        whole_at = wait_until(
            "every model replica serving again",
            lambda: all_serving_since(cluster, ended_at),
            RECOVERY_TIMEOUT_S,
        )
        record.whole_s = whole_at - fault_at
        replaced_at = replacement_served(cluster, before)
        record.replacement_serves_s = None if replaced_at is None else replaced_at - fault_at
        time.sleep(TAIL_S)
    finally:
        load.stop()
        for outcome in load.outcomes:
            record.slowest_s = max(record.slowest_s, outcome.answered_at - outcome.sent_at)
            if outcome.kind == AUDIO:
                record.audio += 1
            elif outcome.kind == REFUSED:
                record.refused[outcome.detail] += 1
            else:
                record.other.append(outcome.detail)
        RECORDS.append(record)
    waits = [o.answered_at - o.sent_at for o in load.outcomes if o.answered_at < fault_at]
    record.median_before_s = statistics.median(waits) if waits else None
    first = load.first_audio_after(fault_at)
    record.first_audio_s = None if first is None else first - fault_at
    record.voices_lost = 0 if voice_intact(cluster, voice) else 1
    record.job = job_outcome(cluster, job_id, at_fault)
    assert load.counts()[OTHER] == 0, record.other
    assert record.audio > 0
    assert record.voices_lost == 0


def pids_named(node: RayNode, title: str) -> list[int]:
    """Pids in ``node``'s namespace whose process title starts with ``title``."""
    found = []
    for pid in node.namespace.pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                found.append(pid)
    return found


def test_killed_serve_controller(cluster, saved_voice):
    record = FaultRecord("SIGKILL of Serve's controller (head)")
    (controller,) = pids_named(cluster.head, "ray::ServeController")

    def kill_controller() -> float:
        started = time.monotonic()
        os.kill(controller, signal.SIGKILL)
        wait_until(
            "a new controller",
            lambda: [p for p in pids_named(cluster.head, "ray::ServeController") if p != controller],
            RECOVERY_TIMEOUT_S,
        )
        wait_until("serve status", lambda: cluster.serve("status"), RECOVERY_TIMEOUT_S)
        record.note = f"`serve status` answers again after {time.monotonic() - started:.1f} s"
        return time.time()

    run_fault(cluster, saved_voice, record, kill_controller)
    assert record.replacement_serves_s is None  # the replicas live on without their controller


def worker_with_replica(cluster: Cluster) -> RayNode:
    return cluster.node_at(model_replicas(cluster)[0]["node_ip"])


def test_worker_link_cut_for_20_s(cluster, saved_voice):
    record = FaultRecord(f"a worker's link down {LINK_CUT_S:.0f} s, then up")
    worker = worker_with_replica(cluster)
    (node_id,) = cluster.node_ids(worker)

    def cut_link() -> float:
        worker.namespace.cut()
        try:
            time.sleep(LINK_CUT_S)
        finally:
            worker.namespace.restore()
        restored_at = time.time()
        # A node the GCS declared dead while it was cut is gone for good (its raylet exits when it
        # hears so): a new one takes its place. One that was not declared dead serves on.
        time.sleep(5)
        if node_id in cluster.node_ids(worker):
            record.note = "the node was never declared dead"
        else:
            started = time.monotonic()
            cluster.restart(worker)
            record.note = f"declared dead; a new node joined {time.monotonic() - started:.1f} s after restart"
        return restored_at

    run_fault(cluster, saved_voice, record, cut_link)


def test_worker_node_killed(cluster, saved_voice):
    record = FaultRecord("SIGKILL of a worker's raylet and workers")
    worker = worker_with_replica(cluster)

    def kill_node() -> float:
        worker.kill()
        killed_at = time.time()
        started = time.monotonic()
        cluster.restart(worker)  # the lost node's replacement joins at once
        record.note = f"a new node joined {time.monotonic() - started:.1f} s after the kill"
        return killed_at

    run_fault(cluster, saved_voice, record, kill_node)
    assert record.replacement_serves_s is not None
