"""Core attention on torch kernels for megatron-core's SelfAttention, and the mask convention.

Mask convention of megatron_moca's LLM (what `attention_mask` carries into a layer):
  * None: every token attends to every token of its row (bidirectional) or to those before it
    (causal). SDPA runs its flash / cuDNN kernels with no mask at all.
  * an integer tensor [b, s] of document ids (negative = padding): a token attends only to tokens
    of the same row and document (and, causal, not after it). Padding tokens attend among themselves
    so that no softmax row is empty; their outputs are never used.
  * a bool tensor [b, 1, s|1, s], True = masked out (megatron's convention): used as given.
`TorchCoreAttention` turns document ids into the fastest kernel available: flash-attn varlen
segments, a flex_attention block mask (skips cross-document blocks; 5.9x faster than a masked
SDPA at 16k tokens on an H200), or a dense SDPA mask (CPU).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

PACKED_KERNELS = ("sdpa", "flex", "flash")


def allowed_from_document_ids(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Dense [b, 1, s, s] bool, True = may attend, from document ids [b, s]."""
    allowed = doc_ids[:, :, None] == doc_ids[:, None, :]
    if causal:
        s = doc_ids.shape[1]
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return allowed.unsqueeze(1)


def segment_bounds(doc_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32) of the runs of equal (row, document id) in the flattened [b*s] tokens."""
    b, s = doc_ids.shape
    flat = doc_ids.reshape(-1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    change[::s] = True  # every row starts a segment
    starts = change.nonzero().flatten()
    return torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)


def thd_params(doc_ids: torch.Tensor):
    """megatron's PackedSeqParams for Transformer Engine's THD layout of one packed row [1, s]: each run of one
    document id is a sequence (the padding at the end too: it attends only to itself, as in the other
    backends), cu_seqlens int32 on the row's device. After Megatron-Bridge's training/vlm_step.py."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = segment_bounds(doc_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


class _OneEntryCache:
    """Remembers the last value computed from one tensor object (the mask is shared by all layers)."""

    def __init__(self):
        self._ref, self._key, self._value = None, None, None

    def get(self, tensor: torch.Tensor, key, build):
        key = (key, tensor._version)  # an in-place change of the same tensor object invalidates
        if self._ref is not None and self._ref() is tensor and self._key == key:
            return self._value
        self._value = build()
        self._ref, self._key = weakref.ref(tensor), key
        return self._value


_FLEX_CACHE = _OneEntryCache()
_DENSE_CACHE = _OneEntryCache()
_SEGMENT_CACHE = _OneEntryCache()
_compiled_flex = None
_FLEX_UNSUPPORTED = set()  # (q shape, k shape, dtype) the compiled flex kernel could not handle


def _flex_attention(q, k, v, doc_ids: torch.Tensor, causal: bool, enable_gqa: bool):
    """q/k/v [b, h, s, d] -> [b, h, s, d] with a document block mask; compiled on CUDA. Returns None
    where inductor has no kernel for the shape (the caller then uses the dense SDPA mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    b, _, s, _ = q.shape

    def build():
        def mask_mod(bi, _h, qi, ki):
            same = doc_ids[bi, qi] == doc_ids[bi, ki]
            return same & (qi >= ki) if causal else same

        return create_block_mask(mask_mod, b, None, s, s, device=q.device)

    block_mask = _FLEX_CACHE.get(doc_ids, (causal, q.device), build)
    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return compiled_or_none(_compiled_flex, (tuple(q.shape), tuple(k.shape), q.dtype), q, k, v,
                            block_mask=block_mask, enable_gqa=enable_gqa)


def no_kernel_for_shape(exc: BaseException) -> bool:
    """Whether a compiled flex_attention failed because inductor has no kernel for the shape (its
    NoValidChoicesError, possibly wrapped by dynamo's BackendCompilerFailed) - and not for anything else
    (an out-of-memory, a compiler crash, a bad input), which must not turn into a silent slow path."""
    seen = exc
    for _ in range(8):
        if seen is None:
            return False
        if type(seen).__name__ == "NoValidChoicesError" or "NoValidChoicesError" in str(seen).split("\n")[0]:
            return True
        seen = seen.__cause__ or getattr(seen, "inner_exception", None) or seen.__context__
    return False


def compiled_or_none(compiled, key, *args, **kwargs):
    """compiled(*args) - or None, for a shape inductor has no kernel for (remembered: the caller then uses the
    dense SDPA mask for that shape, about 5x slower at 16k tokens, and a warning says so once). Seen with
    torch 2.11 on an H100: NoValidChoicesError for some small shapes (b=3, s=100, head_dim 16). Any other
    failure is raised."""
    if key in _FLEX_UNSUPPORTED:
        return None
    try:
        return compiled(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - told apart below: only "no kernel" falls back
        if not no_kernel_for_shape(exc):
            raise
        _FLEX_UNSUPPORTED.add(key)
        logging.getLogger(__name__).warning(
            "flex_attention has no kernel for %s (%s: %s); this shape uses a dense SDPA mask from now on (~5x "
            "slower attention)", key, type(exc).__name__, str(exc).splitlines()[0][:200])
        return None


def _flash_varlen(q, k, v, doc_ids: torch.Tensor, causal: bool):
    """q/k/v [b, s, h, d] -> [b, s, h, d] with flash-attn varlen kernels over document segments."""
    from flash_attn import flash_attn_varlen_func

    b, s = doc_ids.shape
    cu = _SEGMENT_CACHE.get(doc_ids, None, lambda: segment_bounds(doc_ids))
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                                 v.reshape(b * s, *v.shape[2:]), cu, cu, max_len, max_len, causal=causal)
    return out.reshape(b, s, *out.shape[1:])


class TorchCoreAttention(MegatronModule):
    """megatron-core core attention on torch SDPA (flash/cuDNN kernels, GQA without repeating K/V),
    with flex_attention or flash-attn varlen kernels for packed documents.

    `packed_kernel` picks the kernel for document-id masks: 'flash', 'flex' or 'sdpa' (dense mask).
    Follows the constructor protocol of megatron/core/transformer/dot_product_attention.py.
    """

    packed_kernel = "sdpa"

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("TorchCoreAttention takes packed documents as document ids in attention_mask, "
                             "not PackedSeqParams")
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention does not support attention_bias")
        causal = (attn_mask_type or self.attn_mask_type) in (AttnMaskType.causal, AttnMaskType.padding_causal)
        sq, b, nq, hd = query.shape
        gqa = key.shape[2] != nq
        dropout = self.dropout_p if self.training else 0.0
        mask = attention_mask
        if mask is not None and not mask.dtype == torch.bool:
            kernel = self.packed_kernel
            if kernel == "flash" and query.is_cuda:
                out = _flash_varlen(*(t.transpose(0, 1) for t in (query, key, value)), mask, causal)
                return out.transpose(0, 1).reshape(sq, b, nq * hd)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            if kernel == "flex":
                out = _flex_attention(q, k, v, mask, causal, gqa)
                if out is not None:
                    return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hd)
            allowed = _DENSE_CACHE.get(mask, causal, lambda: allowed_from_document_ids(mask, causal))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
            return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hd)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and sq > 1, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:  # megatron bool mask: True = masked out, taken as complete (causality included)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hd)


@functools.lru_cache(maxsize=None)
def core_attention_class(packed_kernel: str) -> type:
    """A TorchCoreAttention subclass bound to one packed-document kernel (specs hold classes)."""
    if packed_kernel not in PACKED_KERNELS:
        raise ValueError(f"packed kernel {packed_kernel!r} not in {PACKED_KERNELS}")
    return type(f"TorchCoreAttention_{packed_kernel}", (TorchCoreAttention,), {"packed_kernel": packed_kernel})
