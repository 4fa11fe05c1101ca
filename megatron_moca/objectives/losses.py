"""Token cross-entropy over (vocab-parallel) logits.

With the vocabulary on one rank (TP=1), torch's fused `F.cross_entropy` (one log_softmax pass forward,
one backward) is used on fp32 logits, as HF's loss does; megatron-core's `vocab_parallel_cross_entropy`
makes about twice as many passes over the [tokens, vocab] tensor (max, subtract, exp, sum, divide in
place; scale backward) because it must all-reduce between them, so it is kept for TP > 1 only.
Positions labelled IGNORE_INDEX contribute 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_moca.objectives.masking import IGNORE_INDEX


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (same shape as labels) of vocab-parallel logits [..., vocab/tp] (any float dtype;
    computed in fp32). IGNORE_INDEX labels give 0."""
    from megatron.core import parallel_state, tensor_parallel

    logits = logits.float()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none")
        return loss.view(labels.shape)
    ignored = labels == IGNORE_INDEX
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.masked_fill(ignored, 0))
    return loss.masked_fill(ignored, 0.0)
