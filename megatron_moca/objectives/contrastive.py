"""MoCa's stage-2 objective: InfoNCE over data-parallel-gathered in-batch negatives plus each query's
own hard negatives (spec moca-method.md, "Stage 2").

    logits = [ q_g @ p_g^T  |  <q_i, n_ij> for j < k ] / temperature          [B_global, B_global + k]
    loss   = cross_entropy(logits, target = i)   (mean over the B_global queries)

q, p, n are L2-normalised embeddings, so the products are cosine similarities. Embeddings of the other
data-parallel ranks are all-gathered without gradient and this rank's slice is put back with its
gradient (after open_clip's gather_features): every rank computes the same global loss, but its
backward reaches only its own inputs. Each rank's gradient is then exactly the global loss's gradient
through its inputs, so a wrapper that AVERAGES gradients over ranks (DDP) must be given
`loss * data_parallel_size` (`dp_scaled`) to train on the global loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class ContrastiveConfig:
    """Stage-2 loss settings (the MoCa reference's values)."""

    temperature: float = 0.03
    """Softmax temperature of the cosine similarities."""
    hard_negatives: int = 2
    """Hard negatives per query (shorter lists are padded by repeating their last entry)."""


def gather_with_local_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' x concatenated in rank order; only this rank's slice carries gradient."""
    if group is None and not dist.is_initialized():
        return x
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x
    return torch.cat(parts)


def hard_negative_index(counts: Sequence[int], k: int) -> torch.Tensor:
    """[len(counts), k] positions into the concatenation of each query's hard-negative list (query i has
    counts[i] of them): longer lists are cut to k, shorter ones padded by repeating their last entry (the
    reference's rule); a query without any is all -1 (masked out of the loss: there is nothing to repeat)."""
    index = torch.full((len(counts), k), -1, dtype=torch.long)
    offset = 0
    for i, n in enumerate(counts):
        used = min(n, k)
        if used:
            index[i] = offset + torch.arange(k).clamp(max=used - 1)
        offset += used
    return index


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: Optional[torch.Tensor] = None,
             cfg: ContrastiveConfig = ContrastiveConfig(), group=None,
             negative_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The global InfoNCE loss from this rank's [b, d] queries and positives and [b, k, d] hard negatives
    (L2-normalised); negative_mask [b, k] (True = a real negative) drops the slots of queries that have
    none. Returns (loss, metrics: accuracy of the diagonal over the global batch)."""
    q = gather_with_local_grad(query.float(), group)
    p = gather_with_local_grad(positive.float(), group)
    logits = q @ p.T  # [B, B]: query i against every positive of the global batch
    if negatives is not None and negatives.shape[1]:
        n = gather_with_local_grad(negatives.float(), group)  # [B, k, d]
        scores = torch.einsum("bd,bkd->bk", q, n)
        if negative_mask is not None:
            mask = gather_with_local_grad(negative_mask.to(q.device, torch.uint8), group).bool()  # gloo: no bool
            scores = scores.masked_fill(~mask, float("-inf"))
        logits = torch.cat([logits, scores], dim=1)
    logits = logits / cfg.temperature
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=1) == target).float().mean().item()
    return loss, {"contrastive_loss": loss.item(), "accuracy": accuracy}


def dp_scaled(loss: torch.Tensor, group=None) -> torch.Tensor:
    """The loss to backpropagate when gradients are averaged over the data-parallel ranks."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    return loss * world
