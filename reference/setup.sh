#!/usr/bin/env bash
# Build the reference-oracle venv (.venv-ref) holding upstream chatterbox-tts 0.1.7.
# It is a separate interpreter on purpose: upstream's import name `chatterbox` clashes with
# ours, so the reference only ever runs as a subprocess (reference/runner.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REF_VENV:-$repo/.venv-ref}"
python="${PYTHON:-python3}"

# Imports are checked with -I: from the repo root, our own chatterbox/ would shadow upstream's.
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -I -c "import chatterbox.tts_turbo" 2>/dev/null; then
  echo "reference venv ready: $venv"
  exit 0
fi
"$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# Upstream's own runtime imports at versions it was written against; numpy<2 as it declares
# (under numpy 2 its loudness step yields float64 audio and its tokenizer then fails).
$pip install -q \
  "torch==2.11.0" "torchaudio==2.11.0" "numpy<2" \
  "transformers==5.2.0" "diffusers==0.29.0" "conformer==0.3.2" einops \
  pyloudnorm omegaconf safetensors "librosa==0.11.0" scipy resemble-perth pyyaml tqdm onnx
# Upstream pins torch 2.6 and pulls in gradio and more: install the two packages alone.
$pip install -q --no-deps "chatterbox-tts==0.1.7" "s3tokenizer==0.3.0"
"$venv/bin/python" -I -c "import chatterbox.tts_turbo, s3tokenizer; print('reference venv ready:', '$venv')"
