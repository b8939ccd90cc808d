"""One real Ray cluster for the `cluster` tests: a head and two worker nodes, each its own `ray start`
in its own network namespace on a bridge made here, the application deployed with `serve deploy` of
configs/cluster-cpu-tiny.yaml through the head's dashboard, saved voices and jobs on a directory
every node sees, and the jobs' Redis on this machine's end of the bridge.

The head offers CPUs only; each worker offers no CPU and one of the custom resource `gpu_node`,
which only the model replicas ask for: the head stands for the CPU nodes of a real cluster, the
workers for its GPU nodes. Everything made here is removed at the end of the session, and the
session fails if any namespace, link or process of it is left.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from chatterbox.hub import cached_tiny_checkpoint
from tests.cluster.faults import RECORDS, table
from tests.cluster.harness import (
    BIN,
    DASHBOARD_PORT,
    GCS_PORT,
    HTTP_PORT,
    Dashboard,
    Network,
    RayNode,
    wait_until,
)
from tests.serve.conftest import REPO_ROOT, voice_wav

APP_NAME = "tts"
MODEL_DEPLOYMENT = "TurboModel"
CONFIG = REPO_ROOT / "configs" / "cluster-cpu-tiny.yaml"
# The shipped config's placeholders: the directory every node mounts, and the jobs' broker.
SHARED_DIR_PLACEHOLDER = "/mnt/chatterbox"
BROKER_PLACEHOLDER = "redis://redis:6379/0"
WORKERS = 2
GPU_NODE_RESOURCE = '{"gpu_node": 1}'
NODE_START_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 300.0


@dataclass
class Cluster:
    network: Network
    head: RayNode
    workers: list[RayNode]
    dashboard: Dashboard
    env: dict[str, str]
    shared_dir: Path

    @property
    def url(self) -> str:
        """Serve's HTTP proxy on the head."""
        return f"http://{self.head.address}:{HTTP_PORT}"

    def serve(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `serve` CLI against the head's dashboard, as an operator runs it."""
        return subprocess.run(
            [str(BIN / "serve"), *args, "-a", self.dashboard.url],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    def node_at(self, address: str) -> RayNode:
        return next(node for node in [self.head, *self.workers] if node.address == address)

    def node_ids(self, node: RayNode) -> set[str]:
        """Ids of the live nodes at ``node``'s address."""
        return {i for i, address in self.dashboard.alive_nodes().items() if address == node.address}

    def wait_alive(self, node: RayNode, not_ids: frozenset[str] = frozenset()) -> str:
        """The id of ``node`` once it is alive (a node other than ``not_ids``)."""
        return wait_until(
            f"{node.role} alive",
            lambda: next(iter(self.node_ids(node) - not_ids), None),
            NODE_START_TIMEOUT_S,
        )

    def restart(self, node: RayNode) -> str:
        """Kill whatever is left of ``node`` and start a new node in its place, as a replacement
        machine joins (at once: the dead one need not be declared dead first); its id."""
        old = frozenset(self.node_ids(node))
        node.kill()
        node.start()
        return self.wait_alive(node, old)


REDIS_PORT = 6390


def start_redis(address: str, password: str, folder: Path) -> subprocess.Popen[bytes]:
    """Redis on ``address`` (this machine's end of the bridge), which every node reaches."""
    return subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(REDIS_PORT),
            "--bind",
            address,
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            password,
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )


def deployed_config(shared_dir: Path, broker_url: str, into: Path) -> Path:
    """The shipped config with its two placeholders filled in, and nothing else changed."""
    text = CONFIG.read_text()
    assert SHARED_DIR_PLACEHOLDER in text and BROKER_PLACEHOLDER in text
    into.write_text(
        text.replace(SHARED_DIR_PLACEHOLDER, str(shared_dir)).replace(BROKER_PLACEHOLDER, broker_url)
    )
    return into


def processes_in(namespace_inodes: set[int]) -> list[int]:
    """Pids of processes whose network namespace is one of ``namespace_inodes``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns" / "net").st_ino in namespace_inodes:
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the cluster harness needs root and iproute2 (network namespaces)")
    root = Path(tempfile.mkdtemp(prefix="cb-"))  # short: Ray's unix sockets live under it
    network = Network(prefix=f"cb{os.getpid() % 100_000}")
    inodes: set[int] = set()
    nodes: list[RayNode] = []
    redis_server = None
    dashboard = None
    try:
        network.create()
        head_ns = network.add_namespace("head")
        worker_ns = [network.add_namespace(f"w{i}") for i in range(1, WORKERS + 1)]
        inodes = {os.stat(f"/run/netns/{ns.name}").st_ino for ns in [head_ns, *worker_ns]}
        token = secrets.token_hex(16)
        env = {
            **os.environ,
            # Token authentication, as `ray start` on a real cluster; the CLI and our REST calls send it.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
            # Every node's memory monitor would watch this whole machine (shared with other work) and
            # kill our replicas and controller when it passes 95 %: seen here during a deploy.
            "RAY_memory_monitor_refresh_ms": "0",
        }
        head = RayNode(
            "head",
            head_ns,
            root / "head",
            [
                "--head",
                f"--port={GCS_PORT}",
                "--num-cpus=1",
                f"--dashboard-host={head_ns.address}",
                f"--dashboard-port={DASHBOARD_PORT}",
            ],
            env,
        )
        nodes.append(head)
        head.start()
        shared_dir = root / "shared"
        # The weights are on the shared volume before any replica starts (as in an image).
        cached_tiny_checkpoint(shared_dir / "tiny-cache")
        redis_server = start_redis(network.gateway, token, root)
        broker = redis.Redis(host=network.gateway, port=REDIS_PORT, password=token)
        wait_until("redis", broker.ping, 10, 0.05, (redis.RedisError,))
        broker_url = f"redis://:{token}@{network.gateway}:{REDIS_PORT}/0"
        dashboard = Dashboard(f"http://{head_ns.address}:{DASHBOARD_PORT}", token)
        workers = [
            RayNode(
                ns.name.rsplit("-", 1)[1],
                ns,
                root / ns.name,
                [
                    f"--address={head_ns.address}:{GCS_PORT}",
                    "--num-cpus=0",
                    f"--resources={GPU_NODE_RESOURCE}",
                ],
                env,
            )
            for ns in worker_ns
        ]
        nodes.extend(workers)
        cluster = Cluster(network, head, workers, dashboard, env, shared_dir)
        cluster.wait_alive(head)
        for worker in workers:
            worker.start()
        for worker in workers:
            cluster.wait_alive(worker)
        cluster.serve("deploy", str(deployed_config(shared_dir, broker_url, root / "serve-config.yaml")))
        wait_until(
            "application RUNNING",
            lambda: dashboard.applications()["applications"][APP_NAME]["status"] == "RUNNING",
            DEPLOY_TIMEOUT_S,
            2.0,
        )
        yield cluster
    finally:
        if dashboard is not None:
            dashboard.close()
        errors = []
        try:
            network.destroy()
        except RuntimeError as error:
            errors.append(str(error))
        for node in nodes:
            if node.process is not None:
                node.process.wait(10)  # `ray start --block`, killed with its namespace
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(10)
        if request.session.testsfailed:  # every node's Ray logs, where pytest keeps its temp dirs
            kept = tmp_path_factory.mktemp("cluster-logs")
            for node in (node for node in nodes if node.logs().is_dir()):
                shutil.copytree(
                    node.logs(), kept / node.role, ignore_dangling_symlinks=True, dirs_exist_ok=True
                )
            print(f"\nRay logs of the cluster: {kept}")
        shutil.rmtree(root, ignore_errors=True)
        leftovers = network.leftovers()
        stray = processes_in(inodes)
        assert not errors and not leftovers and not stray, (errors, leftovers, stray)


@pytest.fixture(scope="session")
def saved_voice(cluster: Cluster) -> dict:
    """A voice saved through the API before any fault: it must outlive all of them."""
    clip = base64.b64encode(voice_wav(6.0)).decode("ascii")
    response = httpx.post(f"{cluster.url}/v1/voices", json={"name": "narrator", "audio": clip}, timeout=120)
    assert response.status_code == 201, response.text
    return response.json()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RECORDS:
        terminalreporter.write_sep("=", "cluster faults (docs/scaling.md)")
        terminalreporter.write_line(table())
