"""Stage 2's step: forward + backward of one global batch of pairs on this rank.

    PooledEncoder     the module that is trained (and, with FSDP, the sharding root): a batch of inputs ->
                      L2-normalised mean-pooled embeddings (embed.embedder.pooled_embeddings)
    ContrastiveStep   InfoNCE over the gathered embeddings (+ hard negatives), GradCache when a group has
                      more than one chunk
    pad_negative_chunks  equal chunk counts on every rank (what FSDP's collectives need)

With FSDP every forward of a sharded module is a collective (its parameters are all-gathered), so every
rank must run the same modules the same number of times: a chunk without images still runs the vision
tower (on one blank 2x2-patch image, its output added with weight 0, so gradients and results are
unchanged), and a rank with fewer hard-negative chunks embeds one-token padding chunks that no query
scores against.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron_moca.objectives.contrastive import ContrastiveConfig


class PooledEncoder(torch.nn.Module):
    """backbone: an HF Qwen2_5_VLModel (`model.model`). always_run_vision: run the vision tower on every
    batch (FSDP)."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device, always_run_vision: bool = False):
        super().__init__()
        self.backbone, self.device, self.always_run_vision = backbone, device, always_run_vision

    def forward(self, batch: dict) -> torch.Tensor:
        from megatron_moca.embed.embedder import pooled_embeddings

        blank = None
        if self.always_run_vision and batch["pixel_values"] is None:
            blank = self._blank_image_features()  # first, where HF runs the vision tower: the same gather order
        embeddings = pooled_embeddings(self.backbone, batch, self.device)
        return embeddings if blank is None else embeddings + 0.0 * blank.float().sum()

    def _blank_image_features(self) -> torch.Tensor:
        vision = self.backbone.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.zeros(merge * merge, width, device=self.device)
        grid = torch.tensor([[1, merge, merge]], device=self.device)
        out = self.backbone.visual(pixels, grid_thw=grid)
        return getattr(out, "pooler_output", out)  # transformers 5: an output object; 4: the merged tensor


def padding_chunk() -> dict:
    """One one-token text input: a chunk that only keeps a rank's collectives in step with the others."""
    return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "valid": torch.ones(1, 1, dtype=torch.bool),
            "position_ids": torch.zeros(3, 1, 1, dtype=torch.long), "pixel_values": None, "image_grid_thw": None}


def pad_negative_chunks(step: dict, device: torch.device, group=None) -> dict:
    """`step` with as many hard-negative chunks as the rank with the most (collective). The padding rows
    come after the real ones, so negative_index never points at them."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return step
    count = torch.tensor([len(step["negatives"])], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    missing = int(count.item()) - len(step["negatives"])
    return {**step, "negatives": step["negatives"] + [padding_chunk() for _ in range(missing)]} if missing else step


class ContrastiveStep:
    """Forward + backward of one global batch on this rank: InfoNCE over gathered embeddings, with
    GradCache when a group has more than one chunk. Returns (loss, metrics, whether GradCache ran)."""

    def __init__(self, encoder: torch.nn.Module, objective: ContrastiveConfig, device: torch.device, autocast: bool):
        self.encoder, self.objective, self.device, self.autocast = encoder, objective, device, autocast

    def encode(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.encoder(batch)

    def loss(self, index: torch.Tensor, q, p, n=None):
        from megatron_moca.objectives.contrastive import info_nce

        k = index.shape[1]
        negatives = mask = None
        if k:
            mask = index >= 0
            if n is None or not n.shape[0]:  # no hard negatives on this rank
                negatives = q.new_zeros(q.shape[0], k, q.shape[1])
            else:
                negatives = n[index.clamp(min=0)]
        return info_nce(q, p, negatives, self.objective, negative_mask=mask)

    def __call__(self, step: dict):
        from megatron_moca.objectives.grad_cache import GradCache

        index = step["negative_index"].to(self.device)
        groups: List[List[dict]] = [step["queries"], step["positives"]]
        if step["negatives"]:
            groups.append(step["negatives"])
        if all(len(chunks) == 1 for chunks in groups):
            loss, metrics = self.loss(index, *[self.encode(chunks[0]) for chunks in groups])
            loss.backward()
            return loss.detach(), metrics, False
        from torch.distributed.fsdp import FSDPModule

        from megatron_moca.training.fsdp import deferred_gradient_sync

        no_sync = (lambda: deferred_gradient_sync(self.encoder)) if isinstance(self.encoder, FSDPModule) else None
        cache = GradCache(self.encode, lambda *emb: self.loss(index, *emb), no_sync=no_sync)
        loss, metrics = cache.step(groups)
        return loss, metrics, True

