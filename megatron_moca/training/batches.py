"""Packed rows -> the micro-batches of one optimizer step, and the step's global loss normalisers.

One rank per data-parallel replica (TP rank 0 of pipeline stage 0) reads rows from the loader and
broadcasts them, still compact (uint8 pixels or encoded images), to the replica's other TP and PP
ranks (after Megatron-LM's broadcast of batches over the tensor-parallel group); each rank then builds
its model inputs on its own device. The first stage uses the pixels, the last stage the labels and MAE
targets, all stages the ids, positions and document ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_moca.objectives.masking import IGNORE_INDEX

_BATCH_DIM = {"position_ids": 1}  # [3, b, s]; other per-token tensors are [b, s]
_PER_TOKEN = ("input_ids", "position_ids", "document_ids", "labels", "mae_token_mask")
_PER_IMAGE = ("pixel_values", "image_grid_thw", "mae_targets")  # concatenated in row order


def collate(rows: List[Dict[str, Optional[torch.Tensor]]]) -> Dict[str, Optional[torch.Tensor]]:
    """Rows (PackedBatch.model_inputs, each b=1) stacked into one micro-batch; image tensors are
    concatenated in row order, which is the row-major order of the image tokens and MAE positions."""
    if len(rows) == 1:
        return rows[0]
    out = {key: torch.cat([r[key] for r in rows], dim=_BATCH_DIM.get(key, 0)) for key in _PER_TOKEN}
    for key in _PER_IMAGE:
        parts = [r[key] for r in rows if r[key] is not None]
        out[key] = torch.cat(parts) if parts else None
    return out


@dataclass
class StepBatch:
    """One optimizer step's micro-batches on this rank, with the whole global batch's counts."""

    micro_batches: List[Dict[str, Optional[torch.Tensor]]]
    mlm_tokens: int
    """Masked text tokens in the global batch (all micro-batches, all DP ranks)."""
    mae_values: int
    """Noised pixel values (MAE targets) in the global batch."""
    tokens: int
    """Non-padding tokens in the global batch."""
    data_seconds: float
    """Time this rank waited for its rows."""
    num_microbatches: int
    dp_size: int

    @property
    def loss_scale(self) -> float:
        """What a micro-batch's loss (normalised by the global counts) is multiplied by so that megatron's
        division by the micro-batch count and DDP's average over DP ranks give the global per-token loss."""
        return float(self.num_microbatches * self.dp_size)


class StepBatches:
    """Iterates StepBatch over a loader of PackedBatch rows."""

    def __init__(self, rows: Optional[Iterator], num_microbatches: int, micro_batch_size: int,
                 device: torch.device, pixel_dtype: torch.dtype, image_decoder=None, dp_group=None,
                 replica_group=None, replica_source: Optional[int] = None):
        """rows: the loader's rows (read on the replica's source rank only); replica_group: the replica's
        TP x PP ranks, replica_source: the global rank among them that reads (None: every rank reads)."""
        self.rows, self.num_microbatches, self.micro_batch_size = rows, num_microbatches, micro_batch_size
        self.device, self.pixel_dtype, self.image_decoder = device, pixel_dtype, image_decoder
        self.dp_group, self.replica_group, self.replica_source = dp_group, replica_group, replica_source

    def _packed_rows(self) -> list:
        n = self.num_microbatches * self.micro_batch_size
        if self.replica_source is None:
            return [next(self.rows) for _ in range(n)]
        rows = [next(self.rows) for _ in range(n)] if dist.get_rank() == self.replica_source else [None] * n
        dist.broadcast_object_list(rows, src=self.replica_source, group=self.replica_group,
                                   device=self.device if self.device.type == "cuda" else None)
        return rows

    def __iter__(self):
        return self

    def __next__(self) -> StepBatch:
        start = time.perf_counter()
        packed = self._packed_rows()
        micro = []
        for m in range(self.num_microbatches):
            rows = [row.model_inputs(self.device, self.pixel_dtype, self.image_decoder)
                    for row in packed[m * self.micro_batch_size:(m + 1) * self.micro_batch_size]]
            micro.append(collate(rows))
        waited = time.perf_counter() - start
        counts = torch.tensor([
            sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
            sum(b["mae_targets"].numel() for b in micro if b["mae_targets"] is not None),
            sum(int((b["document_ids"] >= 0).sum()) for b in micro)], dtype=torch.int64, device=self.device)
        dp_size = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        if dp_size > 1:
            dist.all_reduce(counts, group=self.dp_group)
        mlm, mae, tokens = (int(c) for c in counts.tolist())
        return StepBatch(micro, mlm, mae, tokens, waited, self.num_microbatches, dp_size)
