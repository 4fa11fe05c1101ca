#!/usr/bin/env python
"""Measure stage 2's peak GPU memory for a recipe on one GPU and compare it with tools/memory_plan.py.

    python tools/memory_check.py [--recipe examples/finetune_qwen25vl_3b.yaml] [--pairs 24] [--out DIR]

Writes a random Qwen2.5-VL of the recipe's size (bf16 safetensors, as a stage-1 export would be) and
worst-case pairs (every query, positive and hard negative: a max_pixels image plus text up to the
recipe's max_length), runs `moca finetune` for 2 steps with `--pairs` pairs per step, and prints the
measured peak (torch.cuda.max_memory_allocated, the run's mem_gib) next to the plan's prediction and
their ratio (issue 13 asks for within 15%). Needs a CUDA GPU; it writes ~8 GB (3B) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_worst_case_pairs(folder: str, count: int, side: int, words: int) -> str:
    """`count` rows whose query, positive and two hard negatives each carry a side x side image and text."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "Pairs"), exist_ok=True)
    text = " ".join(f"word{i}" for i in range(words))
    rows = []
    for i in range(count):
        names = []
        for j in range(4):
            name = f"images/p{i}_{j}.png"
            Image.new("RGB", (side, side), ((37 * i) % 255, (91 * j) % 255, 128)).save(os.path.join(folder, name))
            names.append(name)
        rows.append({"qry": f"<|image_1|>{text}", "qry_image_path": names[0], "pos_text": f"<|image_1|>{text}",
                     "pos_image_path": names[1], "neg_text": [f"<|image_1|>{text}"] * 2, "neg_image_path": names[2:]})
    with open(os.path.join(folder, "Pairs", "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def main(argv=None) -> int:
    import torch

    from megatron_moca.config.finetune import load_finetune_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=os.path.join(REPO, "examples", "finetune_qwen25vl_3b.yaml"))
    parser.add_argument("--pairs", type=int, default=24, help="pairs per step on the one GPU (reference: 24)")
    parser.add_argument("--out", default="/tmp/memory_check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("memory_check needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import memory_plan
    from megatron_moca.config.model import preset
    from megatron_moca.conversion.hf_io import copy_side_files
    from megatron_moca.conversion.random_hf import write_random_hf

    model = "qwen25vl_7b" if "7b" in os.path.basename(args.recipe) else "qwen25vl_3b"
    overrides = [f"train.global_batch_size={args.pairs}", "train.train_iters=2", "checkpoint.save_interval=100",
                 "logging.log_interval=1", "data.num_workers=2"]
    cfg = load_finetune_config(args.recipe, ["model.path=x", "data.paths=x", "checkpoint.save=x", *overrides])
    hf = os.path.join(args.out, "hf")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        write_random_hf(hf, preset(model), torch.bfloat16, seed=0)
        copy_side_files(None, hf)
    side = int(cfg.data.image.max_pixels ** 0.5) // 28 * 28  # the largest square image within the bound
    image_tokens = (side // 28) ** 2
    pairs = write_worst_case_pairs(os.path.join(args.out, "pairs"), args.pairs, side,
                                   words=max(cfg.data.max_length - image_tokens - 8, 8) // 4)  # ~3 tokens a word
    save = os.path.join(args.out, "run")
    subprocess.run(["rm", "-rf", save], check=True)
    proc = subprocess.run([sys.executable, "-m", "megatron_moca.cli", "finetune", "--config", args.recipe,
                           f"model.path={hf}", f"data.paths={pairs}", f"checkpoint.save={save}", *overrides],
                          cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    with open(os.path.join(save, "metrics.jsonl")) as f:
        measured = max(json.loads(line)["mem_gib"] for line in f)
    _, parts = memory_plan.plan(args.recipe, 1, overrides)
    predicted = sum(parts.values()) / memory_plan.GIB  # allocations only: the plan's fixed overhead is not allocated
    result = {"recipe": os.path.basename(args.recipe), "pairs_per_gpu": args.pairs,
              "gpu": torch.cuda.get_device_name(), "measured_gib": round(measured, 2),
              "predicted_gib": round(predicted, 2), "ratio": round(predicted / measured, 3),
              "parts_gib": {k: round(v / memory_plan.GIB, 2) for k, v in parts.items()}}
    print(json.dumps(result))
    return 0 if abs(predicted / measured - 1) <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
