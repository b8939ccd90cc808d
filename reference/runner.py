"""Run one reference computation inside the oracle venv (``.venv-ref``); never imported by our code.

Usage: ``.venv-ref/bin/python reference/runner.py AREA.TASK WORKDIR``

``WORKDIR`` holds ``inputs.safetensors`` (optional) and ``params.json``; the task writes
``outputs.safetensors`` and ``outputs.json`` there. ``AREA.TASK`` names the function ``TASK`` in
the module ``ref_AREA.py`` beside this file. Each task takes ``(tensors, params)`` and returns
``(tensors, json_values)``. The upstream package is imported as ``chatterbox`` here, which is why
this only ever runs as a subprocess of our tests (reference/oracle.py).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    task_name, workdir = sys.argv[1], Path(sys.argv[2])
    area, _, func = task_name.partition(".")
    task = getattr(importlib.import_module(f"ref_{area}"), func)
    inputs_path = workdir / "inputs.safetensors"
    tensors = load_file(inputs_path) if inputs_path.exists() else {}
    params = json.loads((workdir / "params.json").read_text())
    torch.manual_seed(params.pop("torch_seed", 0))
    out_tensors, out_values = task(tensors, params)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in out_tensors.items()}, workdir / "outputs.safetensors"
    )
    (workdir / "outputs.json").write_text(json.dumps(out_values))


if __name__ == "__main__":
    main()
