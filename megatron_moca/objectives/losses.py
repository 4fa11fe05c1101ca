"""Token cross-entropy over (vocab-parallel) logits.

With the vocabulary on one rank (TP=1) on CUDA the loss is `_TokenCrossEntropy`: the forward keeps the
logits (in their own dtype) and one log-sum-exp per token; the backward forms (softmax - one-hot) * grad
in fp32 from them and rounds once to the logits' dtype - HF's arithmetic (fp32 logits, `F.cross_entropy`,
one rounding of the gradient) without its fp32 copies of the [tokens, vocab] tensor: `logits.float()`,
the saved log-softmax and the fp32 gradient are each 2x the bf16 logits, about 22 GB of memory traffic
at 4096 x 151936 tokens x vocab where this makes 3 passes over the bf16 logits (~4 GB). Both halves are
compiled (inductor fuses each into one reduction / one elementwise kernel; dynamic shapes: stage 1's
masked-token count changes every step). On the CPU, where exp() rather than memory traffic bounds it,
torch's fused `F.cross_entropy` on fp32 logits is faster (~1.5x) and is used. megatron-core's
`vocab_parallel_cross_entropy` (an all-reduce between its passes) is kept for TP > 1. Positions
labelled IGNORE_INDEX contribute 0 and get a zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_moca.objectives.masking import IGNORE_INDEX


def _log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def _logits_gradient(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                     grad: torch.Tensor) -> torch.Tensor:
    """(softmax - one_hot(label)) * grad per row, in fp32, rounded to the logits' dtype; 0 where ignored."""
    columns = torch.arange(logits.shape[-1], device=logits.device)
    softmax = torch.exp(logits.float() - lse[:, None])
    one_hot = (columns[None, :] == labels[:, None]).float()
    scale = torch.where(labels == IGNORE_INDEX, 0.0, grad.float())
    return ((softmax - one_hot) * scale[:, None]).to(logits.dtype)


_compiled = {}


def _kernel(fn, compiled: bool):
    """fn, or fn compiled by inductor (dynamic row count; once per function) where `compiled`."""
    if not compiled:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _on_device_kernels(logits: torch.Tensor) -> bool:
    # a torch.compile region around the loss traces the plain functions itself
    return logits.is_cuda and logits.shape[0] > 0 and not torch.compiler.is_compiling()


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token CE of logits [n, vocab] (any float dtype) at labels [n]; fp32 loss [n]. `compiled`: run
    the two halves through inductor (CUDA); else eagerly (the tests check the arithmetic that way)."""

    @staticmethod
    def forward(ctx, logits, labels, compiled: bool):
        lse = _kernel(_log_sum_exp, compiled)(logits)
        picked = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, lse, labels)
        ctx.compiled = compiled
        return torch.where(labels == IGNORE_INDEX, 0.0, lse - picked)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, labels = ctx.saved_tensors
        return _kernel(_logits_gradient, ctx.compiled)(logits, lse, labels, grad), None, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (same shape as labels, fp32) of vocab-parallel logits [..., vocab/tp] (any float
    dtype). IGNORE_INDEX labels give 0."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if _on_device_kernels(flat):
            loss = _TokenCrossEntropy.apply(flat, flat_labels, True)
        else:
            loss = F.cross_entropy(flat.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
        return loss.view(labels.shape)
    logits = logits.float()
    ignored = labels == IGNORE_INDEX
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.masked_fill(ignored, 0))
    return loss.masked_fill(ignored, 0.0)
