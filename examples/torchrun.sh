#!/usr/bin/env bash
# Stage 1 or stage 2 on one node: every GPU a process.
#   examples/torchrun.sh pretrain examples/pretrain_qwen25vl_3b.yaml data.paths=/data/shards checkpoint.save=/runs/s1
#   examples/torchrun.sh finetune examples/finetune_qwen25vl_3b.yaml model.path=/ckpt/s1_hf data.paths=/data/MMEB-train
#   examples/torchrun.sh finetune examples/finetune_qwen25vl_7b.yaml ...   (FSDP2 over the node's GPUs: 8 x 80 GB)
#   NPROC=2 examples/torchrun.sh finetune examples/finetune_tiny_cpu.yaml ... parallel.fsdp=true   (FSDP on gloo)
# On a CPU machine, NPROC=2 runs two gloo processes (e.g. with examples/*_tiny_cpu.yaml).
set -euo pipefail
COMMAND=${1:?pretrain or finetune}
CONFIG=${2:?YAML recipe}
shift 2
case "$COMMAND" in pretrain|finetune) ;; *) echo "first argument: pretrain or finetune, not $COMMAND" >&2; exit 2;; esac
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=${NPROC:-1}
[ "$NPROC" -ge 1 ] || NPROC=1
exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_moca.cli "$COMMAND" --config "$CONFIG" "$@"
