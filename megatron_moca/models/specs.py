"""Attention backends and megatron-core layer specs for the language model.

Backends (ModelConfig.attention_backend):
  te     Transformer Engine layer spec (fused LN+linear, FP8-capable). Packed documents go to TE as THD:
         one packed row per micro-batch (PackedSeqParams, cu_seqlens from the document ids), mask type
         padding (bidirectional within each document) or padding_causal, as Megatron-Bridge feeds packed
         Qwen-VL rows to TE (training/vlm_step.py) - so FP8 works with MoCa's packing.
  flash  local linears + torch SDPA; flash-attn varlen kernels for packed documents.
  flex   local linears + torch SDPA; flex_attention document block masks for packed documents.
  sdpa   local linears + torch SDPA; a dense SDPA mask for packed documents (CPU default).
  local  megatron-core's stock unfused DotProductAttention (reference; slow on GPU).
  auto   te if Transformer Engine imports on a CUDA machine and the run's rows can go to it (packed rows
         need micro_batch_size 1), else flash if flash-attn imports, else flex on CUDA, else sdpa.
Where Transformer Engine is absent and MOCA_STANDINS=te (the simulated test tier), `te` builds the local
spec with a stand-in of TE's attention (standins/te_attention.py), so the THD wiring runs on the CPU.
The bidirectional switch is the spec's attn_mask_type (no config flag exists in megatron-core), set
before the layer is built. Design follows megatron/core/models/gpt/gpt_layer_specs.py.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, Optional

import torch

from megatron_moca.errors import UserError


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_kernels() -> Dict[str, bool]:
    """What this machine could use, without importing the GPU packages."""
    from megatron_moca import standins

    has_flex = _importable("torch.nn.attention.flex_attention")
    return {"cuda": torch.cuda.is_available(), "te": _importable("transformer_engine"),
            "flash": _importable("flash_attn"), "flex": has_flex, "sdpa": True, "local": True,
            "te_standin": standins.enabled("te")}


def te_refusal(packed_micro_batch: Optional[int]) -> Optional[str]:
    """Why the TE backend cannot take a run's rows (None: it can). packed_micro_batch: the micro-batch size
    when rows hold several documents (None: one document per row)."""
    if packed_micro_batch is not None and packed_micro_batch > 1:
        return (f"Transformer Engine takes packed documents as one THD sequence per micro-batch, and "
                f"train.micro_batch_size={packed_micro_batch}: set train.micro_batch_size=1 (data.pack_length sets "
                "the tokens per micro-step) or another attention_backend")
    return None


def resolve_backend(requested: str, packed_micro_batch: Optional[int] = None) -> str:
    """The concrete backend a run would use for `requested` on this machine; `auto` never picks one that
    refuses the run's rows (packed_micro_batch: te_refusal), and an explicit choice that would is refused."""
    kinds = available_kernels()
    te_here = kinds["te_standin"] or (kinds["cuda"] and kinds["te"])
    if requested == "auto":
        if kinds["cuda"] and kinds["te"] and te_refusal(packed_micro_batch) is None:
            return "te"
        if kinds["cuda"] and kinds["flash"]:
            return "flash"
        if kinds["cuda"] and kinds["flex"]:
            return "flex"
        return "sdpa"
    if (requested == "te" and not te_here) or (requested == "flash" and not (kinds["cuda"] and kinds["flash"])):
        raise UserError(f"attention_backend={requested!r} needs CUDA and the {requested} package; "
                        f"use 'auto', 'sdpa' or 'local' on this machine")
    if requested == "te" and te_refusal(packed_micro_batch):
        raise UserError(f"attention_backend='te': {te_refusal(packed_micro_batch)}")
    return requested


def llm_layer_spec(backend: str, causal: bool):
    """ModuleSpec of one Qwen2 decoder layer for a concrete backend and attention mode."""
    from megatron.core.transformer.enums import AttnMaskType

    if backend == "te" and not available_kernels()["te_standin"]:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
        # TE caches mask behaviour at construction; padding = bidirectional within each sequence (THD) or
        # with key padding (sbhd)
        mask_type = AttnMaskType.padding_causal if causal else AttnMaskType.padding
    elif backend == "te":  # the simulated tier: local linears, TE's attention contract (standins/te_attention.py)
        from megatron_moca.standins.te_attention import TEDotProductAttentionStandin

        spec = _local_spec()
        spec.submodules.self_attention.submodules.core_attention = TEDotProductAttentionStandin
        mask_type = AttnMaskType.padding_causal if causal else AttnMaskType.padding
    else:
        from megatron_moca.models.attention import core_attention_class

        spec = _local_spec()
        if backend != "local":
            spec.submodules.self_attention.submodules.core_attention = core_attention_class(backend)
        mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    spec.submodules.self_attention.params["attn_mask_type"] = mask_type
    return spec


def _local_spec():
    """megatron's local GPT layer spec with the Qwen2 pieces: RMSNorm, QKV bias inside the GEMM."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_moca.models.bias_gemm import BiasInGemmColumnParallelLinear
    from megatron_moca.models.norms import RMSNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.linear_qkv = BiasInGemmColumnParallelLinear  # QKV bias
    return spec
