"""Packed rows -> the micro-batches of one optimizer step, and the step's global loss normalisers.

One rank per data-parallel replica (TP rank 0 of pipeline stage 0: the "source") reads the rows and decodes
and resizes their images once (DALI on its GPU, or the device resize), into the compact form: ids, labels,
masks, the images as uint8 one-frame rows and each image's MAE noise vector. It sends each of the replica's
other TP / PP ranks the typed tensors of that form its stage reads, after a small header of shapes and dtypes
(Megatron-LM's broadcast_data per key over the tensor-parallel group; Megatron-Bridge's vlm_step.py sends
each pipeline stage only its keys): the first stage gets the ids and the images, the last the ids, labels
and images (for the MAE targets), a middle stage the ids only. Every rank then finishes its part on its
device (data/samples.complete_inputs: a table lookup and the noise, the same values on every rank). Nothing
is pickled but the header, and no rank but the source decodes or resizes an image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_moca.objectives.masking import IGNORE_INDEX

_BATCH_DIM = {"position_ids": 1}  # [3, b, s]; other per-token tensors are [b, s]
_PER_TOKEN = ("input_ids", "position_ids", "document_ids", "labels", "mae_token_mask")
_PER_IMAGE = ("frames", "image_grid_thw", "mae_noise")  # the compact form's images, concatenated in row order
KEYS = _PER_TOKEN + _PER_IMAGE

_EVERY_STAGE = ("input_ids", "position_ids", "document_ids")
_IMAGES = ("frames", "image_grid_thw", "mae_noise", "mae_token_mask")  # noised pixels / MAE targets are made from these
STAGE_KEYS = {"first": _EVERY_STAGE + _IMAGES, "last": _EVERY_STAGE + ("labels",) + _IMAGES, "middle": _EVERY_STAGE}
"""What each pipeline stage needs of a compact micro-batch: the forward's inputs, on the last the loss's."""


def stage_keys(first: bool, last: bool) -> tuple:
    keys = (STAGE_KEYS["first"] if first else ()) + (STAGE_KEYS["last"] if last else ()) + STAGE_KEYS["middle"]
    return tuple(k for k in KEYS if k in keys)


def collate(rows: List[Dict[str, Optional[torch.Tensor]]]) -> Dict[str, Optional[torch.Tensor]]:
    """Compact rows (PackedBatch.compact_inputs, each b=1) stacked into one micro-batch; image tensors are
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
    shapes: List = None
    """training.flops.StepShape of each micro-batch (from every key, so built where the whole batch is)."""

    @property
    def loss_scale(self) -> float:
        """What a micro-batch's loss (normalised by the global counts) is multiplied by so that megatron's
        division by the micro-batch count and DDP's average over DP ranks give the global per-token loss."""
        return float(self.num_microbatches * self.dp_size)


class StepBatches:
    """Iterates StepBatch over a loader of PackedBatch rows."""

    def __init__(self, rows: Optional[Iterator], num_microbatches: int, micro_batch_size: int,
                 device: torch.device, pixel_dtype: torch.dtype, image_decoder=None, dp_group=None,
                 replica_group=None, replica_source: Optional[int] = None, replica_stages: Optional[dict] = None,
                 causal: bool = False):
        """rows: the loader's rows (read on the replica's source rank only); replica_group: the replica's
        TP x PP ranks, replica_source: the global rank among them that reads and builds (None: every rank
        reads, a replica of one); replica_stages: global rank -> (first stage, last stage) of each member."""
        self.rows, self.num_microbatches, self.micro_batch_size = rows, num_microbatches, micro_batch_size
        self.device, self.pixel_dtype, self.image_decoder = device, pixel_dtype, image_decoder
        self.dp_group, self.replica_group, self.replica_source = dp_group, replica_group, replica_source
        self.replica_stages, self.causal = replica_stages or {}, causal
        self.built_rows = 0
        """Rows this rank read and whose images it decoded (only the replica's source does)."""
        self.image_token_id = 151655

    def _build(self) -> Tuple[List[dict], List[dict], List[int], list]:
        """The step's compact micro-batches (images decoded here), their model inputs, the counts (masked
        tokens, MAE values, tokens) and the micro-batches' StepShapes."""
        from megatron_moca.data.samples import complete_inputs
        from megatron_moca.training.flops import step_shape_of

        n = self.num_microbatches * self.micro_batch_size
        packed = [next(self.rows) for _ in range(n)]
        self.built_rows += n
        compact = [collate([row.compact_inputs(self.device, self.image_decoder)
                            for row in packed[m * self.micro_batch_size:(m + 1) * self.micro_batch_size]])
                   for m in range(self.num_microbatches)]
        image_token = packed[0].image_token_id if packed else 151655
        self.image_token_id = image_token
        micro = [complete_inputs(b, self.pixel_dtype, image_token) for b in compact]
        counts = [sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
                  sum(b["mae_targets"].numel() for b in micro if b["mae_targets"] is not None),
                  sum(int((b["document_ids"] >= 0).sum()) for b in micro)]
        return compact, micro, counts, [step_shape_of(b, self.causal) for b in micro]

    def _distributed(self) -> Tuple[List[dict], List[int], list]:
        """The source builds and sends; every other member receives the keys its stage reads and finishes them."""
        from megatron_moca.data.samples import complete_inputs

        me, source = dist.get_rank(), self.replica_source
        if me == source:
            compact, micro, counts, step_shapes = self._build()
            header = [[{k: (tuple(b[k].shape), str(b[k].dtype).replace("torch.", "")) for k in KEYS
                        if b[k] is not None} for b in compact], counts, step_shapes, self.image_token_id]
        else:
            header = None
        box = [header]
        dist.broadcast_object_list(box, src=source, group=self.replica_group,
                                   device=self.device if self.device.type == "cuda" else None)
        shapes, counts, step_shapes, image_token = box[0]
        ops = []
        if me == source:
            for rank, stages in sorted(self.replica_stages.items()):
                if rank != source:
                    wanted = stage_keys(*stages)
                    ops += [dist.P2POp(dist.isend, b[k].contiguous(), rank, group=self.replica_group)
                            for b in compact for k in KEYS if k in wanted and b[k] is not None]
        else:
            wanted = stage_keys(*self.replica_stages[me])
            compact = [{k: None for k in KEYS} for _ in shapes]
            for b, entries in zip(compact, shapes):
                for k, (shape, dtype) in entries.items():
                    if k in wanted:
                        b[k] = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                        ops.append(dist.P2POp(dist.irecv, b[k], source, group=self.replica_group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if me != source:
            micro = [complete_inputs(b, self.pixel_dtype, image_token) for b in compact]
        return micro, counts, step_shapes

    def __iter__(self):
        return self

    def __next__(self) -> StepBatch:
        start = time.perf_counter()
        if self.replica_source is None:
            _, micro, counts, shapes = self._build()
        else:
            micro, counts, shapes = self._distributed()
        waited = time.perf_counter() - start
        counts = torch.tensor(counts, dtype=torch.int64, device=self.device)
        dp_size = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        if dp_size > 1:
            dist.all_reduce(counts, group=self.dp_group)
        mlm, mae, tokens = (int(c) for c in counts.tolist())
        return StepBatch(micro, mlm, mae, tokens, waited, self.num_microbatches, dp_size, shapes)
