"""The Hugging Face Qwen2.5-VL <-> megatron_moca parameter mapping, as a pure table (no megatron import).

Megatron side: parameter names of `MocaVLM` built at TP=1/PP=1 (the dist checkpoint then reshards to
any TP/PP on load). HF side: the legacy on-disk layout (`model.layers.*`, `visual.*`, `lm_head.*`);
transformers >= 4.52 in-memory names (`model.language_model.*`, `model.visual.*`) are accepted on read.
Transforms (each with an exact inverse):
  llm_qkv    q/k/v projections (and biases) -> one fused tensor laid out per KV group [q(heads/group), k, v]
  vit_qkv    ViT fused qkv [q_all; k_all; v_all] -> per head [q, k, v] (so TP shards hold whole heads)
  gated      gate_proj, up_proj -> fc1 = [gate; up]
  vit_gated  as gated, each half zero-padded to VisionConfig.padded_intermediate_size
  vit_fc2    ViT down_proj weight, input columns zero-padded likewise (to_hf refuses non-zero padding)
  patch      Conv3d weight [D, C, T, P, P] -> Linear weight [D, C*T*P*P] (same patch-row order)
  copy       as is
Tied embeddings (3B): no lm_head on disk; the output layer reads the embedding. The <|mask|> row
(151665) is one of the padded vocabulary rows, so it maps like every other row: no resize.
Design after Megatron-Bridge models/qwen_vl/qwen25_vl_bridge.py (a declarative mapping registry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from megatron_moca.config.model import ModelConfig
from megatron_moca.errors import UserError


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: Tuple[str, ...]
    kind: str = "copy"


def build_rules(cfg: ModelConfig) -> List[Rule]:
    """Every parameter of the model, once."""
    rules = [Rule("language.embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
             Rule("language.decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not cfg.language.tie_word_embeddings:
        rules.append(Rule("language.output_layer.weight", ("lm_head.weight",)))
    for i in range(cfg.language.num_layers):
        m, h = f"language.decoder.layers.{i}.", f"model.layers.{i}."
        rules += [
            Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
            Rule(m + "self_attention.linear_qkv.weight",
                 tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "llm_qkv"),
            Rule(m + "self_attention.linear_qkv.bias", tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv"), "llm_qkv"),
            Rule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
            Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
            Rule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gated"),
            Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    rules.append(Rule("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), "patch"))
    for j in range(cfg.vision.depth):
        m, h = f"vision.blocks.{j}.", f"visual.blocks.{j}."
        rules += [Rule(m + "norm1.weight", (h + "norm1.weight",)), Rule(m + "norm2.weight", (h + "norm2.weight",))]
        rules += [Rule(m + f"attn.qkv.{p}", (h + f"attn.qkv.{p}",), "vit_qkv") for p in ("weight", "bias")]
        rules += [Rule(m + f"attn.proj.{p}", (h + f"attn.proj.{p}",)) for p in ("weight", "bias")]
        rules += [Rule(m + f"mlp.linear_fc1.{p}", (h + f"mlp.gate_proj.{p}", h + f"mlp.up_proj.{p}"), "vit_gated")
                  for p in ("weight", "bias")]
        rules += [Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "vit_fc2"),
                  Rule(m + "mlp.linear_fc2.bias", (h + "mlp.down_proj.bias",))]
    rules.append(Rule("vision.merger.ln_q.weight", ("visual.merger.ln_q.weight",)))
    for src, dst in (("0", "fc1"), ("2", "fc2")):
        rules += [Rule(f"vision.merger.{dst}.{p}", (f"visual.merger.mlp.{src}.{p}",)) for p in ("weight", "bias")]
    return rules


_NEW_LAYOUT = [(re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual.")]


def normalize_hf_key(key: str) -> str:
    """transformers >= 4.52 in-memory names -> legacy on-disk names."""
    for pattern, repl in _NEW_LAYOUT:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def _pad_channels(t: torch.Tensor, dim: int, cfg: ModelConfig) -> torch.Tensor:
    """Zero-pad the ViT SwiGLU width along `dim` from intermediate_size to padded_intermediate_size."""
    pad = cfg.vision.padded_intermediate_size - t.shape[dim]
    if pad <= 0:  # nothing to pad, or a tensor wider than the config says: the loader's shape check names it
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _strip_channels(t: torch.Tensor, dim: int, cfg: ModelConfig, name: str) -> torch.Tensor:
    real = cfg.vision.intermediate_size
    padding = t.narrow(dim, real, t.shape[dim] - real)
    if padding.numel() and bool(padding.ne(0).any()):
        # the padded channels would be dropped: the exported model would compute something else
        raise UserError(f"{name}: the padded vision MLP channels {real}..{t.shape[dim] - 1} hold non-zero values "
                        "(a checkpoint trained with them is not a Qwen2.5-VL of intermediate_size "
                        f"{real}); refusing to drop them")
    return t.narrow(dim, 0, real)


def to_mcore(rule: Rule, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Megatron tensor (TP=1) from the HF tensors listed in rule.hf."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "gated":
        return torch.cat(list(tensors), dim=0)
    if rule.kind == "vit_gated":
        return torch.cat([_pad_channels(t, 0, cfg) for t in tensors], dim=0)
    if rule.kind == "vit_fc2":
        return _pad_channels(tensors[0], 1, cfg)
    if rule.kind == "patch":
        return tensors[0].reshape(tensors[0].shape[0], -1)
    if rule.kind == "llm_qkv":
        groups = cfg.language.num_query_groups
        q, k, v = tensors
        tail = q.shape[1:]
        per_group = [t.reshape(groups, -1, *tail) for t in (q, k, v)]
        return torch.cat(per_group, dim=1).reshape(-1, *tail)
    if rule.kind == "vit_qkv":
        vis = cfg.vision
        t = tensors[0]
        tail = t.shape[1:]
        return t.reshape(3, vis.num_heads, vis.head_dim, *tail).transpose(0, 1).reshape(-1, *tail)
    raise ValueError(f"unknown mapping kind {rule.kind!r}")


def to_hf(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF tensors (by on-disk name) from one megatron tensor; the inverse of to_mcore."""
    if rule.kind == "copy":
        parts = [tensor]
    elif rule.kind == "gated":
        parts = list(torch.chunk(tensor, 2, dim=0))
    elif rule.kind == "vit_gated":
        parts = [_strip_channels(half, 0, cfg, rule.mcore) for half in torch.chunk(tensor, 2, dim=0)]
    elif rule.kind == "vit_fc2":
        parts = [_strip_channels(tensor, 1, cfg, rule.mcore)]
    elif rule.kind == "patch":
        vis = cfg.vision
        parts = [tensor.reshape(tensor.shape[0], vis.in_channels, vis.temporal_patch_size, vis.patch_size,
                                vis.patch_size)]
    elif rule.kind == "llm_qkv":
        lang = cfg.language
        groups, d = lang.num_query_groups, lang.head_dim
        q_per_group = lang.num_attention_heads // groups * d
        tail = tensor.shape[1:]
        grouped = tensor.reshape(groups, q_per_group + 2 * d, *tail)
        parts = [p.reshape(-1, *tail) for p in torch.split(grouped, [q_per_group, d, d], dim=1)]
    elif rule.kind == "vit_qkv":
        vis = cfg.vision
        tail = tensor.shape[1:]
        parts = [tensor.reshape(vis.num_heads, 3, vis.head_dim, *tail).transpose(0, 1).reshape(-1, *tail)]
    else:
        raise ValueError(f"unknown mapping kind {rule.kind!r}")
    return {name: p.contiguous() for name, p in zip(rule.hf, parts)}
