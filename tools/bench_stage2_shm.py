#!/usr/bin/env python
"""Bytes one stage-2 step ships from a DataLoader worker to its rank (through shared memory), before and after
the images travel as uint8 one-frame rows instead of float32 pixels, at a recipe's shapes.

    python tools/bench_stage2_shm.py examples/finetune_qwen25vl_3b.yaml --gpus 8

The step is built the way training builds it (ContrastiveSteps over pair tables) from worst-case pairs: a text
query, a positive image and `objective.hard_negatives` negative images per pair, every image at the recipe's
max_pixels. Both layouts are built in this process and their tensor storage is summed (what torch's
DataLoader moves into shared memory); the embeddings they give are the same (tests/cpu/test_embedder.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worst_case_pairs(folder: str, pairs: int, negatives: int, side: int) -> str:
    """`pairs` rows of one subset, each image a distinct side x side picture."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "Pairs"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(pairs):
        names = []
        for j in range(1 + negatives):
            name = f"images/{i}_{j}.png"
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(os.path.join(folder, name))
            names.append(name)
        rows.append({"qry": f"query {i} " * 20, "pos_text": "<|image_1|>\nRepresent the given image.",
                     "pos_image_path": names[0], "neg_text": ["<|image_1|>\nRepresent the given image."] * negatives,
                     "neg_image_path": names[1:]})
    with open(os.path.join(folder, "Pairs", "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def step_bytes(step) -> int:
    """Storage bytes of every tensor in a step (what the DataLoader moves into shared memory)."""
    import torch

    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(step)
    return total


def main(argv=None) -> int:
    import torch

    from megatron_moca.config.finetune import load_finetune_config
    from megatron_moca.data.pairs import BatchPlan, PairsData
    from megatron_moca.embed.inputs import EmbeddingInputs
    from megatron_moca.training.contrastive_batches import ContrastiveSteps

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        probe = load_finetune_config(args.recipe, ["model.path=x", f"data.paths={tmp}"])
        per_rank = probe.train.global_batch_size // args.gpus
        k = probe.objective.hard_negatives
        side = int(probe.data.image.max_pixels ** 0.5) // 28 * 28  # the largest square within max_pixels
        folder = worst_case_pairs(os.path.join(tmp, "pairs"), per_rank, k, side)
        cfg = load_finetune_config(args.recipe, ["model.path=x", f"data.paths={folder}", "data.image_root=" + folder])
        data = PairsData(cfg.data)
        plan = BatchPlan(data.subset_sizes(), per_rank, cfg.data.sampler, cfg.data.seed)
        sizes = {}
        for name, dtype in (("float32 pixels (before)", torch.float32), ("uint8 rows (after)", None)):
            inputs = EmbeddingInputs(None, max_length=cfg.data.max_length, image=cfg.data.image, pixel_dtype=dtype)
            step = ContrastiveSteps(data, plan, inputs, 0, 1, 1, k, cfg.train.micro_batch_size)[0]
            sizes[name] = step_bytes(step)
    before, after = sizes.values()
    print(f"{args.recipe}: {per_rank} pairs per rank x (query + positive + {k} negatives), images {side}x{side} "
          f"(max_pixels {cfg.data.image.max_pixels}), micro_batch_size {cfg.train.micro_batch_size}")
    for name, value in sizes.items():
        print(f"  {name:<24} {value / 2**20:10.1f} MiB per step per rank")
    print(f"  ratio before / after: {before / after:.2f}x; with {cfg.data.num_workers} workers x 2 prefetched steps: "
          f"{2 * max(cfg.data.num_workers, 1) * before / 2**30:.2f} -> "
          f"{2 * max(cfg.data.num_workers, 1) * after / 2**30:.2f} GiB of shared memory per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
