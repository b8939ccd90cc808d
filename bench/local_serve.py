"""A local Ray and Serve on loopback for the benches that drive the Serve application.

Apart from bench/common.py so that the GPU suite, which runs without Ray, imports no Ray."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray import serve

from bench.common import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def local_serve(**ray_options: Any) -> Iterator[int]:
    """Ray on 127.0.0.1 (its workers import this checkout) and Serve's HTTP proxy on a free loopback
    port, which it yields; both are shut down on leaving. `ray_options` go to `ray.init`."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        **ray_options,
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
