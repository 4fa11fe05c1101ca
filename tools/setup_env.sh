#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install megatron_moca with its test extras.
# On a CPU machine torch comes from the local CPU wheel (torch==2.13.0), never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[dev]"
echo "megatron_moca installed in $(pwd)/.venv"
