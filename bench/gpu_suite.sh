#!/usr/bin/env bash
# The CUDA path measured in one offline command: see bench/gpu_suite.py for what it runs.
#
#   bash bench/gpu_suite.sh [--out DIR]                  # one CUDA GPU: full-size fixture
#   bash bench/gpu_suite.sh --device cpu --size tiny     # dry run (CI), mostly S3Gen's compile
#
# Needs Python with torch plus numpy, safetensors and tokenizers (it names any that are missing);
# no download, no Ray, no install of this repo: the repo root goes on PYTHONPATH.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "bench/gpu_suite.sh: $PYTHON cannot import torch; install torch (with CUDA for a GPU run)" >&2
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m bench.gpu_suite "$@"
