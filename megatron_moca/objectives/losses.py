"""Token cross-entropy over (vocab-parallel) logits.

With the vocabulary on one rank (TP=1) the loss is `_TokenCrossEntropy`: the forward keeps the logits
(in their own dtype) and one log-sum-exp per token; the backward forms (softmax - one-hot) * grad in
fp32 from them and rounds once to the logits' dtype - HF's arithmetic (fp32 logits, `F.cross_entropy`,
one rounding of the gradient) without its fp32 copies of the [tokens, vocab] tensor: `logits.float()`,
the saved log-softmax and the fp32 gradient are each 2x the bf16 logits, about 22 GB of memory traffic
at 4096 x 151936 tokens x vocab where this makes 3 passes over the bf16 logits (~4 GB). On CUDA both
halves are compiled (inductor fuses each into one reduction / one elementwise kernel; dynamic shapes:
stage 1's masked-token count changes every step); elsewhere they run eagerly, in row chunks that bound
the fp32 temporaries. megatron-core's `vocab_parallel_cross_entropy` (an all-reduce between its passes)
is kept for TP > 1. Positions labelled IGNORE_INDEX contribute 0 and get a zero gradient.
"""

from __future__ import annotations

import torch

from megatron_moca.objectives.masking import IGNORE_INDEX

_CHUNK_ELEMENTS = 1 << 25  # eager path: fp32 temporaries of at most 128 MiB per chunk


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


def _kernel(fn):
    """fn compiled for CUDA tensors (inductor, dynamic row count), once per function."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _on_device_kernels(logits: torch.Tensor) -> bool:
    # a torch.compile region around the loss traces the plain functions itself
    return logits.is_cuda and logits.shape[0] > 0 and not torch.compiler.is_compiling()


def _row_chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token CE of logits [n, vocab] (any float dtype) at labels [n]; fp32 loss [n]."""

    @staticmethod
    def forward(ctx, logits, labels):
        if _on_device_kernels(logits):
            lse = _kernel(_log_sum_exp)(logits)
        else:
            lse = torch.cat([_log_sum_exp(logits[rows]) for rows in _row_chunks(*logits.shape)]) if len(logits) \
                else logits.new_zeros(0, dtype=torch.float32)
        ignored = labels == IGNORE_INDEX
        picked = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, lse, labels)
        return torch.where(ignored, 0.0, lse - picked)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, labels = ctx.saved_tensors
        if _on_device_kernels(logits):
            return _kernel(_logits_gradient)(logits, lse, labels, grad), None
        out = torch.empty_like(logits)
        for rows in _row_chunks(*logits.shape):
            out[rows] = _logits_gradient(logits[rows], lse[rows], labels[rows], grad[rows])
        return out, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (same shape as labels, fp32) of vocab-parallel logits [..., vocab/tp] (any float
    dtype). IGNORE_INDEX labels give 0."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        vocab = logits.shape[-1]
        loss = _TokenCrossEntropy.apply(logits.reshape(-1, vocab), labels.reshape(-1))
        return loss.view(labels.shape)
    logits = logits.float()
    ignored = labels == IGNORE_INDEX
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.masked_fill(ignored, 0))
    return loss.masked_fill(ignored, 0.0)
