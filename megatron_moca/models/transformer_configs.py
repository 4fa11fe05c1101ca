"""ModelConfig -> megatron-core TransformerConfig for the language model and the vision tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_moca.config.model import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fuse_activations() -> bool:
    """megatron-core's fused SwiGLU (bias + silu * gate in one torch.compile'd kernel each way, see
    megatron/core/fusions/fused_bias_swiglu.py; megatron's own default) where CUDA is available. On the
    CPU the plain ops run: inductor would compile a C++ kernel per shape for no gain."""
    return torch.cuda.is_available()


def _common(cfg: ModelConfig, initialize: bool) -> dict:
    from megatron.core import parallel_state as ps

    dtype = DTYPES[cfg.params_dtype]
    return dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, pipeline_dtype=dtype,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, bias_activation_fusion=fuse_activations(), masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=initialize, init_method_std=0.02)


def language_transformer_config(cfg: ModelConfig, initialize: bool = True):
    """TransformerConfig of the Qwen2 LLM (GQA, QKV bias, SwiGLU, RMSNorm, M-RoPE)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    lang = cfg.language
    # FP8 only in the LLM's layers: megatron's TransformerBlock runs each layer under TE's fp8 autocast
    fp8 = dict(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe) if cfg.fp8 else {}
    recompute = {}
    if cfg.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=cfg.recompute_num_layers)
    elif cfg.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(
        num_layers=lang.num_layers, hidden_size=lang.hidden_size, num_attention_heads=lang.num_attention_heads,
        num_query_groups=lang.num_query_groups, ffn_hidden_size=lang.ffn_hidden_size, kv_channels=lang.head_dim,
        layernorm_epsilon=lang.norm_eps, add_bias_linear=False, add_qkv_bias=True,
        mrope_section=list(lang.mrope_section),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(), **fp8, **recompute,
        **_common(cfg, initialize))


def vision_transformer_config(cfg: ModelConfig, initialize: bool = True):
    """TransformerConfig of the ViT (MHA, biases everywhere, SwiGLU). The tower is not pipelined."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    vis = cfg.vision
    return TransformerConfig(
        num_layers=vis.depth, hidden_size=vis.hidden_size, num_attention_heads=vis.num_heads,
        ffn_hidden_size=vis.padded_intermediate_size, kv_channels=vis.head_dim, layernorm_epsilon=vis.norm_eps,
        add_bias_linear=True, pipeline_model_parallel_size=1, **_common(cfg, initialize))
