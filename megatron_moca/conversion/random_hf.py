"""Write a randomly initialised Qwen2.5-VL checkpoint folder (legacy HF layout), streaming.

No package ships Qwen2.5-VL weights: tests, benchmarks and the demo use random checkpoints of the
exact shapes. Tensors are generated one at a time, so a 3B-shaped folder needs no more memory than
one shard.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Tuple

import torch

from megatron_moca.config.model import ModelConfig
from megatron_moca.conversion.hf_config import hf_config_from_model
from megatron_moca.conversion.hf_io import write_sharded
from megatron_moca.models.transformer_configs import DTYPES


def hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """On-disk tensor name -> shape for a Qwen2.5-VL of these shapes."""
    lang, vis = cfg.language, cfg.vision
    h, d, f = lang.hidden_size, lang.head_dim, lang.ffn_hidden_size
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (lang.vocab_size, h), "model.norm.weight": (h,)}
    if not lang.tie_word_embeddings:
        shapes["lm_head.weight"] = (lang.vocab_size, h)
    for i in range(lang.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                       p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (f, h),
                       p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)})
    dv, fv = vis.hidden_size, vis.intermediate_size
    shapes["visual.patch_embed.proj.weight"] = (dv, vis.in_channels, vis.temporal_patch_size, vis.patch_size,
                                                vis.patch_size)
    for j in range(vis.depth):
        p = f"visual.blocks.{j}."
        shapes.update({p + "norm1.weight": (dv,), p + "norm2.weight": (dv,), p + "attn.qkv.weight": (3 * dv, dv),
                       p + "attn.qkv.bias": (3 * dv,), p + "attn.proj.weight": (dv, dv), p + "attn.proj.bias": (dv,),
                       p + "mlp.gate_proj.weight": (fv, dv), p + "mlp.gate_proj.bias": (fv,),
                       p + "mlp.up_proj.weight": (fv, dv), p + "mlp.up_proj.bias": (fv,),
                       p + "mlp.down_proj.weight": (dv, fv), p + "mlp.down_proj.bias": (dv,)})
    wm = dv * vis.merge_unit
    shapes.update({"visual.merger.ln_q.weight": (dv,), "visual.merger.mlp.0.weight": (wm, wm),
                   "visual.merger.mlp.0.bias": (wm,), "visual.merger.mlp.2.weight": (h, wm),
                   "visual.merger.mlp.2.bias": (h,)})
    return shapes


def random_tensors(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> Iterator[Tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for name, shape in sorted(hf_shapes(cfg).items()):
        if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name or "norm2" in name \
                or name.endswith("ln_q.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        yield name, t.to(dtype)


def write_random_hf(folder: str, cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    os.makedirs(folder, exist_ok=True)
    write_sharded(random_tensors(cfg, dtype, seed), folder, max_shard_bytes)
    name = {d: n for n, d in DTYPES.items()}[dtype]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_from_model(cfg, name), f, indent=2)
