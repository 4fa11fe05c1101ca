"""Stage 2's input pipeline: step -> this rank's slice of the global batch of pairs, as model inputs.

Item `step` of ContrastiveSteps is a pure function of the step (data.pairs.BatchPlan), so a torch
DataLoader with worker processes builds the next steps while the model trains, and a resumed run
starts the loader at its iteration. Each group (queries, positives, hard negatives) is cut into chunks
of train.micro_batch_size inputs (GradCache chunks), each padded to its own longest input.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_moca.data.pairs import BatchPlan, PairsData, Side
from megatron_moca.embed.inputs import PHI3V_IMAGE, EmbeddingInputs, embedder_input
from megatron_moca.objectives.contrastive import hard_negative_index

def side_input(side: Side):
    text, image = side
    return embedder_input(text, image, PHI3V_IMAGE)


class ContrastiveSteps(torch.utils.data.Dataset):
    def __init__(self, data: PairsData, plan: BatchPlan, inputs: EmbeddingInputs, dp_rank: int, dp_size: int,
                 train_iters: int, hard_negatives: int, chunk: Optional[int]):
        self.data, self.plan, self.inputs = data, plan, inputs
        self.dp_rank, self.dp_size, self.train_iters = dp_rank, dp_size, train_iters
        self.k, self.chunk = hard_negatives, chunk

    def __len__(self) -> int:
        return self.train_iters

    def _chunks(self, items: List) -> List[dict]:
        size = self.chunk or max(len(items), 1)
        return [self.inputs.batch(items[i:i + size]) for i in range(0, len(items), size)]

    def __getitem__(self, step: int) -> Dict[str, object]:
        pairs = [self.data.pairs[i] for i in self.plan.local_batch_at(step, self.dp_rank, self.dp_size)]
        negatives = [p.negatives[:self.k] for p in pairs]
        groups = {"queries": self._chunks([side_input(p.query) for p in pairs]),
                  "positives": self._chunks([side_input(p.positive) for p in pairs]),
                  "negatives": self._chunks([side_input(n) for row in negatives for n in row])}
        tokens = sum(int(b["valid"].sum()) for chunks in groups.values() for b in chunks)
        return {**groups, "negative_index": hard_negative_index([len(row) for row in negatives], self.k),
                "tokens": tokens, "step": step}


def step_loader(steps: ContrastiveSteps, start: int, num_workers: int):
    """Items start, start+1, ... of `steps` in order, built ahead by `num_workers` processes."""
    from megatron_moca.distributed.launch import init_loader_worker

    return iter(torch.utils.data.DataLoader(steps, sampler=range(start, len(steps)), batch_size=None,
                                            num_workers=num_workers, prefetch_factor=2 if num_workers else None,
                                            persistent_workers=False, worker_init_fn=init_loader_worker))


def close_loader(loader) -> None:
    """Stop step_loader's worker processes now, the graceful way (each finishes its item and exits): a run that
    stops early (exit_interval, preemption, an error) would otherwise leave them to the interpreter's exit,
    where multiprocessing's SIGTERM does not reach them (they leave preemption signals to the trainer)."""
    shutdown = getattr(loader, "_shutdown_workers", None)  # torch's DataLoader iterator with workers
    if shutdown is not None:
        shutdown()
