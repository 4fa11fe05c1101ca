"""Evaluation over torchrun ranks: `torchrun --nproc-per-node N -m megatron_moca.cli eval ...`.

Each rank embeds a contiguous share of every list of inputs (shares differ by at most one item) and the
embeddings are all-gathered back into the original order, so every rank scores exactly the one-process
matrices (up to the rounding of other batch paddings) and rank 0 reports.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class ShardedEmbedder:
    """Wraps a MocaEmbedder: the same embed() over all ranks of the default process group."""

    def __init__(self, embedder):
        self.embedder = embedder

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def embed(self, items: Sequence, batch_size: int = 8, progress: Optional[str] = None) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        bounds = [len(items) * r // world for r in range(world + 1)]
        sizes = [bounds[r + 1] - bounds[r] for r in range(world)]
        mine = self.embedder.embed(list(items[bounds[rank]:bounds[rank + 1]]), batch_size=batch_size,
                                   progress=f"{progress} (rank 0 of {world})" if progress and rank == 0 else None)
        # nccl gathers device tensors, gloo host ones
        device = self.embedder.device if dist.get_backend() == "nccl" else torch.device("cpu")
        padded = torch.zeros(max(sizes), self.embedder.dimension, device=device)
        padded[:len(mine)] = mine.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).cpu()
