"""One local Ray and one Serve application (tiny checkpoint, CPU, loopback) for every test here.

Starting Ray costs ~4 s and deploying the app ~2 s on two cores, so the whole directory shares one
session-scoped app; tests that need counters read deltas of the model replica's own stats.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import soundfile as sf
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.app import build_app
from serve_app.config import AppArgs

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "tts"
CHUNK_MAX_NEW_TOKENS = 50  # 2 s of audio per chunk at most: random weights rarely stop


@dataclass(frozen=True)
class ServeApp:
    url: str
    metrics_url: str  # Ray's Prometheus endpoint
    args: AppArgs
    ingress: DeploymentHandle
    model: DeploymentHandle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    # Workers must import serve_app and chatterbox from this checkout, not from an installed copy.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    metrics_port = _free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=metrics_port,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = AppArgs(
            model="tiny",  # the replica builds the seeded tiny checkpoint itself
            tiny_cache_dir=str(tmp_path_factory.mktemp("tiny-cache")),
            device="cpu",
            model_num_cpus=0,
            max_batch_size=8,
            max_new_tokens=CHUNK_MAX_NEW_TOKENS,
            watermark=True,
            limits={
                "max_text_chars": 5000,
                "max_reference_bytes": 1024 * 1024,
                "max_reference_seconds": 10.0,
                "max_request_bytes": 2 * 1024 * 1024,
                # Small admission limits, so a burst test needs few requests (8 concurrent still fit).
                "max_active_requests": 8,
            },
            ingress={"num_cpus": 0, "max_ongoing_requests": 16},
            stitcher={"num_cpus": 0},
            shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
        )
        ingress = serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield ServeApp(
            url=f"http://127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            args=args,
            ingress=ingress,
            model=serve.get_deployment_handle("TurboModel", APP_NAME),
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def voice_wav(seconds: float, sample_rate: int = 16_000, silent: bool = False) -> bytes:
    """A voice-like reference: a gliding harmonic tone with a syllable envelope and a little noise."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wav = 0.2 * tone * envelope + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    if silent:
        wav = np.zeros_like(wav)
    buffer = io.BytesIO()
    sf.write(buffer, wav.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
