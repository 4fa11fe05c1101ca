#!/usr/bin/env bash
# One prepared device check: GPU tests + the 3B benchmark against HF, printing a table.
# The lent device has torch + transformers but no megatron-core: carry it as wheels first, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.19.2 pytest
# and run (device tool): carry [".whl"], command "bash tools/gpu_check.sh".
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$(pwd)
else
  export PYTHONPATH=$(pwd)
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m megatron_moca.cli env
python3 -m pytest -q -m gpu tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
python3 tools/bench_gpu.py --preset qwen25vl_3b --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
