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
import torch._dynamo

# Different sequence lengths and the two vision block kinds each add a cache entry; the default
# limit (8) would silently fall back to eager on a long run with varied lengths.
_CACHE_SIZE_LIMIT = 64


def _resolve_default_tp_group_quietly() -> None:
    """megatron-core 0.16-0.19: RowParallelLinear calls its matmul helper with tp_group=None, which then
    resolves the default group through `get_tensor_model_parallel_group_if_none`, issuing a
    DeprecationWarning on every call. Dynamo cannot trace `warnings.warn`, so every row-parallel
    linear split each compiled block into several graphs (more guards run on the host per step).
    Same resolution, without the warning, in the one module that looks it up."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    original = layers.get_tensor_model_parallel_group_if_none
    if getattr(original, "_moca_quiet", False):
        return

    def quiet(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and torch.distributed.is_initialized() and parallel_state.is_initialized():
            if is_expert:
                return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
            return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    quiet._moca_quiet = True
    layers.get_tensor_model_parallel_group_if_none = quiet


def compile_model(model, backend: str = "inductor") -> List[str]:
    """Compile MocaVLM's blocks in place; returns the names of what was compiled."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _CACHE_SIZE_LIMIT)
    _resolve_default_tp_group_quietly()
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
