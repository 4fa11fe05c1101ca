#!/usr/bin/env bash
# Convert a local Qwen2.5-VL checkpoint to a megatron_moca dist checkpoint, check it, and convert back.
#   examples/convert_qwen25vl.sh /models/Qwen2.5-VL-3B-Instruct /ckpt/qwen25vl3b_mcore /models/roundtrip
# The dist checkpoint (torch_dist) reshards on load: train it at any TP/PP that --tp/--pp validate here
# (TP must divide the KV heads: 3B has 2 -> TP <= 2; 7B has 4 -> TP <= 4).
set -euo pipefail
HF=${1:?HF Qwen2.5-VL folder}
MCORE=${2:?output megatron checkpoint directory}
BACK=${3:-}
TP=${TP:-2}
PP=${PP:-1}
moca convert hf-to-mcore --hf "$HF" --output "$MCORE" --tp "$TP" --pp "$PP"
moca convert verify --hf "$HF" --checkpoint "$MCORE"
if [ -n "$BACK" ]; then
  moca convert mcore-to-hf --checkpoint "$MCORE" --output "$BACK" --hf-base "$HF"
fi
