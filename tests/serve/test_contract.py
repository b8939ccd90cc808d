"""The published contract equals the server: schemathesis (a schema-driven fuzzer, from PyPI) runs its
default checks against the tiny CPU profile's `/openapi.json`, with 0 failures, in bounded time.

Two settings are the test's (`schemathesis.toml` beside this file): 413, the server's documented
refusal of a text over the limit, counts as rejecting invalid data; and a schema can say "base64",
not "an audio file of more than 5 s", so on the operations that take a clip a schema-valid clip may
still be refused as audio (4xx naming the field): 400/422 pass the positive-data check there only.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs
from tests.serve.test_burst import profile_args

pytestmark = pytest.mark.contract

APP = "contract"
CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 12  # per operation and phase: bounds the run (each accepted example is synthesised)


@pytest.fixture(scope="module")
def contract_url(serve_app) -> Iterator[str]:
    args = AppArgs.model_validate(
        {
            **profile_args(),
            "tiny_cache_dir": serve_app.args.tiny_cache_dir,
            "max_new_tokens": 10,  # accepted texts are synthesised: keep each short
            "shutdown": {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
        }
    )
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{serve_app.url}/{APP}"
    finally:
        serve.delete(APP)


def test_schemathesis_finds_no_failure(contract_url, tmp_path):
    assert httpx.get(f"{contract_url}/openapi.json", timeout=30).status_code == 200
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{contract_url}/openapi.json",
        "--url",
        contract_url,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "0",
        "--workers",
        "1",
        "--request-timeout",
        "120",
    ]
    start = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    print(f"\nschemathesis took {time.monotonic() - start:.0f} s\n{run.stdout}\n{run.stderr[-2000:]}")
    assert run.returncode == 0
