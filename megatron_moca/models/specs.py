"""Attention backends and megatron-core layer specs for the language model.

Backends (ModelConfig.attention_backend):
  te     Transformer Engine layer spec (fused LN+linear, FP8-capable). Unpacked batches only here.
  flash  local linears + torch SDPA; flash-attn varlen kernels for packed documents.
  flex   local linears + torch SDPA; flex_attention document block masks for packed documents.
  sdpa   local linears + torch SDPA; a dense SDPA mask for packed documents (CPU default).
  local  megatron-core's stock unfused DotProductAttention (reference; slow on GPU).
  auto   te if Transformer Engine imports on a CUDA machine, else flash if flash-attn imports,
         else flex on CUDA, else sdpa.
The bidirectional switch is the spec's attn_mask_type (no config flag exists in megatron-core), set
before the layer is built. Design follows megatron/core/models/gpt/gpt_layer_specs.py.
"""

from __future__ import annotations

import importlib.util
from typing import Dict

import torch

from megatron_moca.errors import UserError


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_kernels() -> Dict[str, bool]:
    """What this machine could use, without importing the GPU packages."""
    has_flex = _importable("torch.nn.attention.flex_attention")
    return {"cuda": torch.cuda.is_available(), "te": _importable("transformer_engine"),
            "flash": _importable("flash_attn"), "flex": has_flex, "sdpa": True, "local": True}


def resolve_backend(requested: str) -> str:
    """The concrete backend a run would use for `requested` on this machine."""
    kinds = available_kernels()
    if requested == "auto":
        if kinds["cuda"] and kinds["te"]:
            return "te"
        if kinds["cuda"] and kinds["flash"]:
            return "flash"
        if kinds["cuda"] and kinds["flex"]:
            return "flex"
        return "sdpa"
    if requested in ("te", "flash") and not (kinds["cuda"] and kinds[requested]):
        raise UserError(f"attention_backend={requested!r} needs CUDA and the {requested} package; "
                        f"use 'auto', 'sdpa' or 'local' on this machine")
    return requested


def llm_layer_spec(backend: str, causal: bool):
    """ModuleSpec of one Qwen2 decoder layer for a concrete backend and attention mode."""
    from megatron.core.transformer.enums import AttnMaskType

    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
        # TE caches mask behaviour at construction; padding = bidirectional with key padding
        mask_type = AttnMaskType.padding_causal if causal else AttnMaskType.padding
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from megatron_moca.models.attention import core_attention_class
        from megatron_moca.models.bias_gemm import BiasInGemmColumnParallelLinear
        from megatron_moca.models.norms import RMSNorm

        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.linear_qkv = BiasInGemmColumnParallelLinear  # QKV bias
        if backend != "local":
            spec.submodules.self_attention.submodules.core_attention = core_attention_class(backend)
        mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    spec.submodules.self_attention.params["attn_mask_type"] = mask_type
    return spec
