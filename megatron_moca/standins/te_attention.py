"""Stand-in for megatron-core's `TEDotProductAttention` (megatron/core/extensions/transformer_engine.py) on top
of Transformer Engine's `DotProductAttention` (transformer_engine/pytorch/attention/dot_product_attention/
dot_product_attention.py), written from their documented contract, in plain torch:

  layouts     qkv_format "sbhd": q [s, b, h, d], k/v [s, b, g, d] -> [s, b, h*d];
              qkv_format "thd" (from PackedSeqParams): q [t, h, d] -> [t, h*d], the sequences of the pack
              delimited by cu_seqlens_q / cu_seqlens_kv (int32, [n+1]); cu_seqlens_*_padded, where given,
              place each sequence in the pack (its tokens are the first seqlen of its padded slot, the rest
              is padding that attends nowhere and is never attended to); max_seqlen_* bound the lengths
  mask types  no_mask, causal (top-left), padding, padding_causal; thd takes only the padding family
              ("thd format ... the only acceptable mask types are padding_causal and padding": TE >= 1.7,
              quoted in megatron's wrapper); padding in sbhd reads attention_mask [b, 1, 1, s_kv] bool,
              True = masked out
  GQA         g key/value heads shared by h / g query heads each (num_gqa_groups)
  scale       softmax_scale, default 1 / sqrt(d)
Dropout is not modelled (MoCa trains without attention dropout); anything else the real layer would accept
(attention bias, context parallelism, sliding windows, FP8) is refused, so a test cannot pass by relying
on something the stand-in only pretends to do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

THD_MASK_TYPES = (AttnMaskType.padding, AttnMaskType.padding_causal)


def _attend(q, k, v, causal: bool, scale: float, allowed: Optional[torch.Tensor] = None):
    """q [h, s, d], k/v [g, s_kv, d] -> [s, h, d]; allowed [s, s_kv] (True = may attend) or None."""
    h, g = q.shape[0], k.shape[0]
    k, v = k.repeat_interleave(h // g, 0), v.repeat_interleave(h // g, 0)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    s, s_kv = scores.shape[-2:]
    keep = torch.ones(s, s_kv, dtype=torch.bool, device=q.device) if allowed is None else allowed
    if causal:
        keep = keep & torch.ones(s, s_kv, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that may attend nowhere outputs zeros
    return (probs @ v.float()).to(q.dtype).transpose(0, 1)


class TEDotProductAttentionStandin(MegatronModule):
    """Takes megatron's TEDotProductAttention constructor and forward arguments; computes what TE computes."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None, num_splits=None,
                 cp_comm_type: Optional[str] = "p2p", pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1 or getattr(config, "window_size", None) is not None:
            raise NotImplementedError("the TE stand-in models neither context parallelism nor sliding windows")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.calls = {"sbhd": 0, "thd": 0}  # what the wiring sent (tests read it)

    def forward(self, query, key, value, attention_mask, attn_mask_type: AttnMaskType = None,
                attention_bias=None, packed_seq_params=None, num_splits=None):
        if attention_bias is not None:
            raise NotImplementedError("the TE stand-in does not model attention_bias")
        mask_type = attn_mask_type or self.attn_mask_type
        scale = self.softmax_scale or 1.0 / math.sqrt(query.shape[-1])
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        fmt = packed_seq_params.qkv_format if packed_seq_params is not None else "sbhd"
        self.calls[fmt] = self.calls.get(fmt, 0) + 1
        if fmt == "thd":
            return self._thd(query, key, value, packed_seq_params, mask_type, causal, scale)
        if fmt != "sbhd":
            raise NotImplementedError(f"qkv_format {fmt!r}")
        s, b = query.shape[:2]
        out = []
        for row in range(b):
            allowed = None
            if mask_type in THD_MASK_TYPES:
                if attention_mask is None:
                    raise ValueError("TE's padding mask types in sbhd need attention_mask [b, 1, 1, s_kv]")
                allowed = ~attention_mask[row, 0, 0][None, :].expand(s, -1)
            out.append(_attend(query[:, row].transpose(0, 1), key[:, row].transpose(0, 1),
                               value[:, row].transpose(0, 1), causal, scale, allowed))
        return torch.stack(out, dim=1).reshape(s, b, -1)

    @staticmethod
    def _thd(query, key, value, params, mask_type, causal: bool, scale: float):
        if mask_type not in THD_MASK_TYPES:
            raise ValueError(f"qkv_format thd takes attn_mask_type padding or padding_causal, not {mask_type.name}")
        cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
        if cu_q is None or cu_kv is None or cu_q.dtype != torch.int32 or cu_kv.dtype != torch.int32:
            raise ValueError("qkv_format thd needs int32 cu_seqlens_q and cu_seqlens_kv")
        pad_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else cu_q
        pad_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else cu_kv
        lengths_q, lengths_kv = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_kv[1:] - cu_kv[:-1]).tolist()
        if int(pad_q[-1]) != query.shape[0] or int(pad_kv[-1]) != key.shape[0]:
            raise ValueError(f"cu_seqlens cover {int(pad_q[-1])} tokens, the pack holds {query.shape[0]}")
        if params.max_seqlen_q is not None and max(lengths_q) > params.max_seqlen_q:
            raise ValueError(f"a sequence of {max(lengths_q)} tokens exceeds max_seqlen_q={params.max_seqlen_q}")
        out = torch.zeros(query.shape[0], query.shape[1], value.shape[-1], dtype=query.dtype, device=query.device)
        for i, (n_q, n_kv) in enumerate(zip(lengths_q, lengths_kv)):
            qs, ks = int(pad_q[i]), int(pad_kv[i])
            if n_q and n_kv:
                out[qs:qs + n_q] = _attend(query[qs:qs + n_q].transpose(0, 1), key[ks:ks + n_kv].transpose(0, 1),
                                           value[ks:ks + n_kv].transpose(0, 1), causal, scale)
        return out.reshape(query.shape[0], -1)
