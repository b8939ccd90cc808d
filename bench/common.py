"""Helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of ``fn()``, with the accelerator's queue drained before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values``; NaN when there are none."""
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a local Serve app)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hardware_name(device: str) -> str:
    """The accelerator's name on CUDA, else the CPU's (what every table's heading states)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def add_model_args(parser: argparse.ArgumentParser, sizes: tuple[str, ...]) -> None:
    """``--size``, ``--checkpoint`` (a full-size directory), ``--device`` and ``--dtype``."""
    parser.add_argument("--size", choices=sizes, default="nano")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=os.environ.get("CHATTERBOX_FULL_CHECKPOINT"),
        help="full-size checkpoint directory (default $CHATTERBOX_FULL_CHECKPOINT, else a random one)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="ours (upstream runs fp32)")


def add_reference_args(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--no-reference``, shared by the benchmarks that run upstream too."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, ours and upstream's (on a shared box, more threads than free cores "
        "make OpenMP stall at every op)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip upstream (no oracle venv)")
