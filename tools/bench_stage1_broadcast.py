#!/usr/bin/env python
"""Bytes a stage-1 replica's source rank sends per step to the other TP / PP ranks of its replica, before
(every packed row pickled and broadcast to all of them: `broadcast_object_list`) and after (a small header,
then only the typed tensors of the compact form each stage reads: training/batches.py), at a recipe's shapes.

    python tools/bench_stage1_broadcast.py examples/pretrain_qwen25vl_7b.yaml --gpus 64 [--tp 2 --pp 1]

Rows are built at the recipe's pack_length with --image-fraction of their tokens image tokens (images of the
recipe's largest size), for each image pipeline: `cpu` (the loader ships uint8 frames), `device_resize`
(decoded images at --decoded-area times their target area), `dali` (encoded JPEG bytes). Both sizes are
measured in this process on the same rows: the pickle that broadcast_object_list sends, and the bytes of
the tensors the new protocol sends (plus its pickled header).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_row(tokens: int, image_fraction: float, image_tokens: int, pipeline: str, decoded_area: float,
                  patch: int = 14):
    """A PackedBatch of `tokens` with images of `image_tokens` tokens each (square) filling image_fraction."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_moca.data.samples import PackedBatch

    n_images = max(1, int(tokens * image_fraction) // image_tokens)
    side = int((image_tokens * 4) ** 0.5)  # patches per side (4 patches per image token)
    grid = torch.tensor([[1, side, side]] * n_images)
    ids = torch.randint(0, 150000, (1, tokens))
    frames = encoded = device_images = None
    if pipeline == "cpu":
        frames = torch.randint(0, 255, (n_images * side * side, 588), dtype=torch.uint8)
    elif pipeline == "device_resize":
        scale = decoded_area ** 0.5
        h = int(side * patch * scale)
        device_images = [torch.randint(0, 255, (h, h, 3), dtype=torch.uint8) for _ in range(n_images)]
    else:  # a smooth picture, JPEG at quality 90: what a photo-like page costs
        y, x = np.mgrid[0:side * patch, 0:side * patch]
        picture = np.stack([(x * 255 // (side * patch)), (y * 255 // (side * patch)), (x + y) % 256], -1)
        buffer = io.BytesIO()
        Image.fromarray(picture.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded = [buffer.getvalue()] * n_images
    return PackedBatch(keys=["doc"], input_ids=ids, labels=ids.clone(), document_ids=torch.zeros_like(ids),
                       position_ids=torch.zeros(3, 1, tokens, dtype=torch.long), pixel_frames=frames,
                       image_grid_thw=grid, mae_token_mask=torch.zeros_like(ids, dtype=torch.bool),
                       mae_noise=torch.randn(n_images, 1176), encoded_images=encoded or [],
                       device_images=device_images or [])


def compact_of(row):
    """The compact form the source sends (its images decoded: frames of the target size)."""
    import torch

    frames = row.pixel_frames
    if frames is None:
        n = int(row.image_grid_thw.prod(-1).sum())
        frames = torch.zeros(n, 588, dtype=torch.uint8)
    out = row.compact_inputs() if row.pixel_frames is not None else None
    if out is None:
        out = {"input_ids": row.input_ids, "position_ids": row.position_ids, "document_ids": row.document_ids,
               "labels": row.labels, "mae_token_mask": row.mae_token_mask, "frames": frames,
               "image_grid_thw": row.image_grid_thw, "mae_noise": row.mae_noise}
    return out


def main(argv=None) -> int:
    from megatron_moca.config.pretrain import load_pretrain_config
    from megatron_moca.training.batches import KEYS, stage_keys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--tp", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--pp", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--image-fraction", type=float, default=0.25)
    parser.add_argument("--decoded-area", type=float, default=2.0,
                        help="device_resize: decoded images' area over their target area (up to 4)")
    args = parser.parse_args(argv)
    cfg = load_pretrain_config(args.recipe, ["data.paths=x", "checkpoint.save=x"])
    tp = args.tp or cfg.parallel.tensor_model_parallel_size
    pp = args.pp or cfg.parallel.pipeline_model_parallel_size
    dp = args.gpus // (tp * pp)
    rows = cfg.train.global_batch_size // dp
    image_tokens = cfg.sample.image.max_pixels // (28 * 28)
    members = [(t == 0 and p == 0, p == 0, p == pp - 1) for p in range(pp) for t in range(tp)]
    print(f"{args.recipe}: TP {tp} x PP {pp} x DP {dp} on {args.gpus} GPUs, {rows} packed rows of "
          f"{cfg.data.pack_length} tokens per replica and step, {args.image_fraction:.0%} image tokens "
          f"({image_tokens} per image)")
    if tp * pp == 1:
        print("  a replica of one rank: nothing is sent either way")
        return 0
    for pipeline in ("cpu", "device_resize", "dali"):
        row = synthetic_row(cfg.data.pack_length, args.image_fraction, image_tokens, pipeline, args.decoded_area)
        before = len(pickle.dumps(row)) * (len(members) - 1) * rows  # one pickle, broadcast to every member
        compact = compact_of(row)
        header = len(pickle.dumps([[{k: (tuple(v.shape), str(v.dtype)) for k, v in compact.items()
                                     if v is not None}], [0, 0, 0], [None], 0]))
        after = 0
        for source, first, last in members:
            if not source:
                after += sum(compact[k].numel() * compact[k].element_size() for k in KEYS
                             if k in stage_keys(first, last) and compact.get(k) is not None) + header
        after *= rows
        print(f"  {pipeline:<14} before {before / 2**20:9.1f} MiB  after {after / 2**20:9.1f} MiB per step "
              f"(source -> {len(members) - 1} rank(s))  before / after {before / max(after, 1):.2f}x"
              + ("  (after: decoded once on the source instead of on every rank)" if pipeline == "dali" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
