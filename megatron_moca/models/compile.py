"""Optional torch.compile of the model's dense glue, one block at a time.

Without Transformer Engine, megatron-core's local layers run RMSNorm, RoPE, SwiGLU and the residual
adds as separate elementwise kernels; compiling each decoder layer lets inductor fuse them. Like
torchtitan (torchtitan/models/llama3/infra/parallelize.py, `apply_compile`), blocks are compiled one
by one (identical blocks share one compiled graph) rather than the whole model, and in place, so
parameter names and checkpoints are unchanged.

What stays eager, on purpose:
  - the core attention of each LLM layer: it is one fused kernel already, and its document-mask
    caches (flex block masks, dense masks) key on tensor identity, which tracing cannot honour;
  - the vision tower's segment attention: its grouping depends on the image layout of each batch,
    so only the dense parts around it (norm, QKV, rotary / projection, residual, MLP) are compiled;
  - Transformer Engine layers: fused already.
"""

from __future__ import annotations

from typing import List

import torch

# Different sequence lengths and the two vision block kinds each add a cache entry; the default
# limit (8) would silently fall back to eager on a long run with varied lengths.
_CACHE_SIZE_LIMIT = 64


def compile_model(model, backend: str = "inductor") -> List[str]:
    """Compile MocaVLM's blocks in place; returns the names of what was compiled."""
    from megatron_moca import compat

    compat.raise_dynamo_cache_limit(_CACHE_SIZE_LIMIT)
    compat.quiet_default_tp_group()  # its warning would split every compiled row-parallel block
    compiled = []
    if model.backend != "te":
        layers = [(f"language.decoder.layers.{i}", layer) for i, layer in enumerate(model.language.decoder.layers)]
        if model.mae_decoder is not None:
            layers.append(("mae_decoder.layer", model.mae_decoder.layer))  # a decoder layer like the others
        for name, layer in layers:
            core = layer.self_attention.core_attention
            core.forward = torch.compiler.disable(core.forward)
            layer.compile(backend=backend)
            compiled.append(name)
    if model.vision is not None:
        for i, block in enumerate(model.vision.blocks):
            block.attention_inputs = torch.compile(block.attention_inputs, backend=backend)
            block.attention_output_and_mlp = torch.compile(block.attention_output_and_mlp, backend=backend)
            compiled.append(f"vision.blocks.{i}")
    return compiled
