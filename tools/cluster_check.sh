#!/usr/bin/env bash
# The one prepared GPU check for the cluster-readiness work (issue 20), under 10 minutes on one GPU:
#   A  versions (`moca env`)                          B  FSDP2 x activation checkpointing (bf16): cos/sin dtypes
#   D  flex at 12,800 tokens vs the dense fallback    C  stage-2 memory vs tools/memory_plan.py (FSDP; replicated
#   E  the GPU tests that exercise the stage-1 loss and compiled kernels           on > 100 GB cards)
# Carry pure-Python wheels as tools/gpu_check.sh documents (.whl/, git-ignored), then with the device tool:
#   carry [".whl"], command "bash tools/cluster_check.sh"; everything lands in $OUT (timeline.txt, *.log).
# Not run yet on a GPU (no device was lent to the session that wrote it): README says so.
set -uo pipefail; cd "$(dirname "$0")/.."
SCRATCH=${SCRATCH:-$(mktemp -d)}
END=$((SECONDS + 570))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $SCRATCH/site .whl/*.whl
  export PYTHONPATH=$SCRATCH/site:$(pwd); else export PYTHONPATH=$(pwd); fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore; OUT=${OUT:-$SCRATCH}
step() {  # step NAME CAP_S CMD... : run with min(CAP, time left), output to $OUT/NAME.log
  local name=$1 cap=$2; shift 2; local left=$((END - SECONDS)); [ "$left" -gt 15 ] || { echo "skip $name" >> "$OUT/skipped.txt"; return; }
  [ "$cap" -lt "$left" ] || cap=$left
  echo "== $name (cap ${cap}s, t=${SECONDS}s)" | tee -a "$OUT/timeline.txt"
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$? t=${SECONDS}s" | tee -a "$OUT/timeline.txt"; tail -c 1500 "$OUT/$name.log"; }
step A_env 25 bash -c 'python3 -c "import torch,transformers;print(torch.__version__,transformers.__version__,torch.cuda.nccl.version(),torch.cuda.get_device_name(),torch.cuda.get_device_properties(0).total_memory/2**30)"; python3 -m megatron_moca.cli env'
step B1_fsdp_ckpt 60 python3 tools/probe_fsdp_gc.py tiny
step B2_fsdp_ckpt_3fwd 60 python3 tools/probe_fsdp_gc.py tiny --three-forwards
step D_flex_12800 100 python3 tools/probe_flex_12800.py
step C1_memory_fsdp 170 python3 tools/probe_memory_fsdp.py --pairs 24 --out $SCRATCH/mc
if python3 -c "import torch,sys;sys.exit(torch.cuda.get_device_properties(0).total_memory<100*2**30)"; then
  step C2_memory_replicated 120 python3 tools/probe_memory_fsdp.py --replicated --pairs 24 --out $SCRATCH/mc; fi
step E_gpu_tests 110 python3 -m pytest -q -p no:cacheprovider -m gpu -o timeout=100 tests/gpu/test_gpu_model.py -k "stage1_loss or compiled_token"
