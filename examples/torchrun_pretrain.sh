#!/usr/bin/env bash
# Stage 1 on one node: every GPU a process (TP x PP x DP = GPUs).
#   examples/torchrun_pretrain.sh examples/pretrain_qwen25vl_3b.yaml data.paths=/data/shards checkpoint.save=/runs/s1
# On a CPU machine, NPROC=2 runs two gloo processes (e.g. with examples/pretrain_tiny_cpu.yaml).
set -euo pipefail
CONFIG=${1:?YAML recipe}
shift
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=${NPROC:-1}
[ "$NPROC" -ge 1 ] || NPROC=1
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_moca.cli pretrain --config "$CONFIG" "$@"
