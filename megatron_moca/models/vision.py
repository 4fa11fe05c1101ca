"""The Qwen2.5-VL vision tower on megatron-core tensor-parallel linears.

Input: pixel rows [N, 1176] in the processor's 2x2-merge order and image_grid_thw [n, 3].
Output: one embedding per merged 2x2 group, [N/4, llm_hidden], in the input order.

Window attention (8x8-patch windows; full attention in `fullatt_block_indexes`) runs as a few large
fused calls: tokens are put in window order once, windows (or whole images) are grouped by length,
and each group of equal-length segments is ONE batched SDPA call ([n_segments, heads, L, d]) - never a
Python loop over windows. On a 3B step HF's per-window tower takes 0.29 s; this layout 0.06 s
(shared/bench/vit_probe.py). Weights shard over TP: QKV, fc1 and merger fc1 column-parallel,
projections row-parallel; QKV is stored per head as [q, k, v] so a TP shard holds whole heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn

from megatron_moca.config.model import VisionConfig
from megatron_moca.models.bias_gemm import (BiasInGemmColumnParallelLinear, BiasInGemmRowParallelLinear,
                                            MLPFc1BiasInGemm, MLPFc2BiasInGemm)
from megatron_moca.models.norms import RMSNorm
from megatron_moca.models.rotary import rotary_qkv
from megatron_moca.models.vision_layout import Segments, segment_attention, vision_layout


class VisionAttention(MegatronModule):
    """QKV and output projections of a ViT block; the block runs the segment attention between them."""

    def __init__(self, config, vcfg: VisionConfig):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads_local = vcfg.num_heads // tp
        self.head_dim = vcfg.head_dim
        self.qkv = BiasInGemmColumnParallelLinear(
            vcfg.hidden_size, 3 * vcfg.hidden_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False)
        self.proj = BiasInGemmRowParallelLinear(
            vcfg.hidden_size, vcfg.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def rotated_qkv(self, x, cos, sin):
        """x [N, d] -> q, k, v [N, heads, head_dim] with the 2-D rotary applied to q and k;
        cos/sin [N, 1, 1, head_dim/2] (one half of the repeated angles)."""
        qkv, _ = self.qkv(x)
        # q and k rotated together in one call (HF's per-tensor float math, bit for bit)
        return rotary_qkv(qkv.view(x.shape[0], self.heads_local, 3, self.head_dim), cos, sin)


@torch.no_grad()
def zero_mlp_padding(mlp: MLP, vcfg: VisionConfig) -> None:
    """Zero this TP rank's share of the padded SwiGLU channels (VisionConfig.intermediate_pad_multiple):
    fc1's gate and up rows and biases, fc2's input columns. Zero there, the channels contribute nothing
    and receive exactly zero gradients, so they stay zero in training."""
    local = vcfg.padded_intermediate_size // mlp.config.tensor_model_parallel_size
    first = parallel_state.get_tensor_model_parallel_rank() * local
    pad = torch.arange(first, first + local) >= vcfg.intermediate_size
    if not bool(pad.any()):
        return
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    fc1.weight.view(2, local, -1)[:, pad.to(fc1.weight.device)] = 0  # local fc1 = [gate; up]
    if fc1.bias is not None:
        fc1.bias.view(2, local)[:, pad.to(fc1.bias.device)] = 0
    fc2.weight[:, pad.to(fc2.weight.device)] = 0


class VisionBlock(MegatronModule):
    def __init__(self, config, vcfg: VisionConfig):
        super().__init__(config=config)
        self.norm1 = RMSNorm(config, vcfg.hidden_size, vcfg.norm_eps)
        self.attn = VisionAttention(config, vcfg)
        self.norm2 = RMSNorm(config, vcfg.hidden_size, vcfg.norm_eps)
        self.mlp = MLP(config, MLPSubmodules(linear_fc1=MLPFc1BiasInGemm,
                                             linear_fc2=MLPFc2BiasInGemm))
        zero_mlp_padding(self.mlp, vcfg)

    # Split around the segment attention so the dense parts can be compiled (models/compile.py)
    # while the layout-dependent attention call stays eager.
    def attention_inputs(self, x, cos, sin):
        return self.attn.rotated_qkv(self.norm1(x), cos, sin)

    def attention_output_and_mlp(self, x, attended):
        out, _ = self.attn.proj(attended.reshape(x.shape[0], -1))
        x = x + out
        out, bias = self.mlp(self.norm2(x))
        return x + (out if bias is None else out + bias)

    def forward(self, x, cos, sin, segments: Segments):
        attended = segment_attention(*self.attention_inputs(x, cos, sin), segments)
        return self.attention_output_and_mlp(x, attended)


class PatchMerger(MegatronModule):
    """RMSNorm per patch, concatenate each 2x2 group, MLP(4d -> 4d -> GELU -> llm hidden)."""

    def __init__(self, config, vcfg: VisionConfig, out_hidden: int):
        super().__init__(config=config)
        width = vcfg.hidden_size * vcfg.merge_unit
        self.width = width
        self.ln_q = RMSNorm(config, vcfg.hidden_size, vcfg.norm_eps)
        self.fc1 = BiasInGemmColumnParallelLinear(width, width, config=config, init_method=config.init_method,
                                                  bias=True, gather_output=False)
        self.fc2 = BiasInGemmRowParallelLinear(width, out_hidden, config=config,
                                               init_method=config.output_layer_init_method, bias=True,
                                               input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        h, _ = self.fc1(self.ln_q(x).view(-1, self.width))
        out, _ = self.fc2(F.gelu(h))
        return out


class VisionTower(MegatronModule):
    def __init__(self, config, vcfg: VisionConfig, out_hidden: int, recompute: bool = False):
        """recompute: keep only each block's input and run the block again in the backward pass."""
        super().__init__(config=config)
        self.vcfg = vcfg
        self.recompute = recompute
        # Conv3d(3, D, kernel=stride=(2,14,14), no bias) over one patch == a linear over its 1176 values
        self.patch_embed = nn.Linear(vcfg.patch_dim, vcfg.hidden_size, bias=False, dtype=config.params_dtype)
        half = vcfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / vcfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half),
                             persistent=False)
        self.blocks = nn.ModuleList([VisionBlock(config, vcfg) for _ in range(vcfg.depth)])
        self.merger = PatchMerger(config, vcfg, out_hidden)
        self.full_blocks = set(vcfg.fullatt_block_indexes)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Like MegatronModule's, but descends into the block list (a plain nn.ModuleList would be
        treated as replicated, dropping the TP sharding of every block's linears)."""
        out = {}
        for name, module in self.named_children():
            if name == "blocks":
                for i, block in enumerate(module):
                    out.update(block.sharded_state_dict(f"{prefix}blocks.{i}.", sharded_offsets, metadata))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=parallel_state.get_tensor_model_parallel_group()))
        return out

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dev = pixel_values.device
        layout = vision_layout(grid_thw.cpu(), self.vcfg, dev)
        unit = self.vcfg.merge_unit
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        n = x.shape[0]
        x = x.view(n // unit, unit, -1)[layout.window_index].reshape(n, -1)
        freqs = (layout.positions.float()[..., None] * self.inv_freq.to(dev)).flatten(1)  # [N, hd/2]
        freqs = freqs[:, None, None, :]  # broadcast over heads and (q, k); HF repeats it over both halves
        cos, sin = freqs.cos(), freqs.sin()
        for i, block in enumerate(self.blocks):
            segs = layout.image_segments if i in self.full_blocks else layout.window_segments
            if self.recompute and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, segs, use_reentrant=False)
            else:
                x = block(x, cos, sin, segs)
        merged = self.merger(x)
        return merged[torch.argsort(layout.window_index)]
