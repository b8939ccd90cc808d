"""A real multi-node Ray cluster on one machine: every node is its own `ray start` in its own network
namespace, joined by a veth pair to a bridge this harness creates, so a node can be killed outright
or cut off from the others (its link set down) for real.

Only names and addresses made here are ever touched: a bridge and namespaces named after this run,
a /24 of the benchmarking range (198.18.0.0/15) that no route of this machine uses yet. Teardown
kills every process inside each namespace (`ip netns pids`) before deleting it, so Ray processes of
other users of the machine are never looked at, let alone stopped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent  # `ray` and `serve` of this environment
GCS_PORT = 6379
DASHBOARD_PORT = 8265
HTTP_PORT = 8000
# The subnets tried, in order: 198.19.N.0/24 for N here (the upper half of the benchmarking range).
SUBNET_THIRD_OCTETS = range(64, 250)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network a route of this machine names (so a subnet of ours never overlaps one)."""
    routes = json.loads(ip("-j", "route", "show", "table", "all").stdout or "[]")
    networks = []
    for route in routes:
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(route["dst"], strict=False))
    return [n for n in networks if n.version == 4]


def free_subnet() -> ipaddress.IPv4Network:
    taken = routed_networks()
    for third in SUBNET_THIRD_OCTETS:
        subnet = ipaddress.ip_network(f"198.19.{third}.0/24")
        if not any(subnet.overlaps(net) for net in taken if net.prefixlen > 0):
            return subnet
    raise RuntimeError("no free /24 in 198.19.0.0/16")


@dataclass
class Namespace:
    """One network namespace with one veth link to the bridge (`host_link` is the bridge's end)."""

    name: str
    address: str
    host_link: str

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.name).stdout.split()]

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in this namespace, and wait until none is left."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes left in {self.name}: {pids}")
            time.sleep(0.1)

    def cut(self) -> None:
        ip("link", "set", self.host_link, "down")

    def restore(self) -> None:
        ip("link", "set", self.host_link, "up")


@dataclass
class Network:
    """A bridge with this machine's end at `.1` and one namespace per node at `.10`, `.11`, ..."""

    prefix: str  # names of everything made here start with it (at most 9 characters)
    subnet: ipaddress.IPv4Network = field(default_factory=free_subnet)
    namespaces: list[Namespace] = field(default_factory=list)
    bridge_up: bool = False

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self.bridge_up = True
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_namespace(self, role: str) -> Namespace:
        index = len(self.namespaces)
        namespace = Namespace(
            name=f"{self.prefix}-{role}",
            address=str(self.subnet.network_address + 10 + index),
            host_link=f"{self.prefix}h{index}",
        )
        inner = f"{self.prefix}n{index}"
        ip("netns", "add", namespace.name)
        self.namespaces.append(namespace)
        ip("link", "add", namespace.host_link, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", namespace.name)
        ip("link", "set", namespace.host_link, "master", self.bridge)
        ip("link", "set", namespace.host_link, "up")
        ip("-n", namespace.name, "addr", "add", f"{namespace.address}/{self.subnet.prefixlen}", "dev", inner)
        ip("-n", namespace.name, "link", "set", inner, "up")
        ip("-n", namespace.name, "link", "set", "lo", "up")
        return namespace

    def destroy(self) -> None:
        """Kill every process in every namespace, then delete the namespaces (and with them their
        veth pairs) and the bridge. Raises at the end if something could not be removed."""
        errors = []
        for namespace in self.namespaces:
            try:
                namespace.kill_all()
            except RuntimeError as error:
                errors.append(str(error))
            deleted = ip("netns", "del", namespace.name, check=False)
            if deleted.returncode:
                errors.append(deleted.stderr.strip())
            ip("link", "del", namespace.host_link, check=False)  # gone with its peer already
        if self.bridge_up:
            deleted = ip("link", "del", self.bridge, check=False)
            if deleted.returncode:
                errors.append(deleted.stderr.strip())
        if errors:
            raise RuntimeError("; ".join(errors))

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist."""
        namespaces = ip("netns", "list").stdout.split()
        links = [link["ifname"] for link in json.loads(ip("-j", "link", "show").stdout or "[]")]
        return [name for name in [*namespaces, *links] if name.startswith(self.prefix)]


@dataclass
class RayNode:
    """One `ray start --block` in its namespace; its `temp_dir` holds the node's sockets and logs."""

    role: str
    namespace: Namespace
    temp_dir: Path
    start_args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.namespace.address

    def start(self) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        log = (self.temp_dir / "ray-start.log").open("ab")
        argv = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={self.address}",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=100000000",
            *self.start_args,
        ]
        self.process = subprocess.Popen(
            self.namespace.command(argv), env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL the node: its raylet, agents and workers (every process in its namespace)."""
        self.namespace.kill_all()
        if self.process is not None:
            self.process.wait(10)

    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


class Dashboard:
    """The head's dashboard: Ray's state API and Serve's REST API, with the cluster's token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self._client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def close(self) -> None:
        self._client.close()

    def get(self, path: str) -> httpx.Response:
        return self._client.get(path)

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> IP address of every node the GCS holds alive (a node restarted at the same
        address is a new node, with a new id)."""
        body = self.get("/api/v0/nodes?limit=100&detail=true").json()
        return {
            node["node_id"]: node["node_ip"]
            for node in body["data"]["result"]["result"]
            if node["state"] == "ALIVE"
        }

    def applications(self) -> dict:
        """Serve's details of every application (what `serve status` summarises)."""
        return self.get("/api/serve/applications/").json()

    def replicas(self, app: str, deployment: str) -> list[dict]:
        """Replica details (replica_id, state, node_ip, actor_id, pid, log_file_path, start_time_s)."""
        details = self.applications().get("applications", {}).get(app)
        if not details:
            return []
        return details["deployments"].get(deployment, {}).get("replicas", [])

    def running_replicas(self, app: str, deployment: str) -> list[dict]:
        return [r for r in self.replicas(app, deployment) if r["state"] == "RUNNING"]


# What a poll of a service that is not back yet may raise.
RETRIED_ERRORS: tuple[type[Exception], ...] = (
    httpx.HTTPError,
    KeyError,
    ValueError,
    subprocess.SubprocessError,
)


def wait_until(
    what: str,
    check: object,
    timeout: float,
    interval: float = 0.5,
    errors: tuple[type[Exception], ...] = RETRIED_ERRORS,
) -> object:
    """Call ``check`` until it returns something true; that value, or a TimeoutError naming ``what``
    (``errors`` raised meanwhile count as not yet)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if value := check():  # type: ignore[operator]
                return value
        except errors as error:
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last error: {last_error!r})")


@contextlib.contextmanager
def network(prefix: str) -> Iterator[Network]:
    net = Network(prefix)
    try:
        net.create()
        yield net
    finally:
        net.destroy()
