"""Call the upstream reference (in its own venv) from our tests, tensors in and out by safetensors.

Upstream's import name ``chatterbox`` clashes with ours, so the reference never enters our
process: each call runs ``reference/runner.py`` under ``.venv-ref/bin/python``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REFERENCE_DIR = Path(__file__).resolve().parent
REPO_ROOT = REFERENCE_DIR.parent
# A relative REF_VENV means relative to where the caller runs (the repo root, as the docs write it).
REF_PYTHON = Path(os.environ.get("REF_VENV", REPO_ROOT / ".venv-ref")).absolute() / "bin" / "python"


class OracleError(RuntimeError):
    """The reference computation failed; the message carries its stderr."""


def reference_available() -> bool:
    return REF_PYTHON.exists()


def run_reference(
    task: str,
    tensors: dict[str, torch.Tensor] | None = None,
    timeout_s: float = 1800,
    **params: Any,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Run ``AREA.TASK`` from ``reference/ref_AREA.py`` in the oracle venv.

    Returns the task's output tensors and its JSON values.
    """
    if not reference_available():
        raise OracleError(f"no reference venv at {REF_PYTHON.parent.parent}: run reference/setup.sh")
    with tempfile.TemporaryDirectory(prefix="chatterbox-ref-") as tmp:
        workdir = Path(tmp)
        if tensors:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, workdir / "inputs.safetensors"
            )
        (workdir / "params.json").write_text(json.dumps(params))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=str(REFERENCE_DIR), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [str(REF_PYTHON), str(REFERENCE_DIR / "runner.py"), task, str(workdir)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise OracleError(f"reference task {task} failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
        out_path = workdir / "outputs.safetensors"
        out_tensors = load_file(out_path) if out_path.exists() else {}
        values = json.loads((workdir / "outputs.json").read_text())
    return out_tensors, values
