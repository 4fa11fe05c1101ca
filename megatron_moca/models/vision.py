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

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_moca.config.model import VisionConfig
from megatron_moca.models.norms import RMSNorm


@dataclass
class Segments:
    """A partition of the (window-ordered) token sequence into attention segments, grouped by length.

    order: token permutation that makes each length group contiguous; inverse: its inverse.
    groups: (length, count) in the order the groups appear after `order`.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    groups: List[Tuple[int, int]]

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device=None) -> "Segments":
        lengths = [int(n) for n in lengths if n > 0]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        by_len = {}
        for start, n in zip(starts, lengths):
            by_len.setdefault(n, []).append(start)
        pieces, groups = [], []
        for n, group_starts in by_len.items():
            pieces.append((torch.tensor(group_starts)[:, None] + torch.arange(n)[None]).flatten())
            groups.append((n, len(group_starts)))
        order = torch.cat(pieces)
        return cls(order=order.to(device), inverse=torch.argsort(order).to(device), groups=groups)


@dataclass
class VisionLayout:
    """Everything the tower needs from image_grid_thw, computed once per batch."""

    window_index: torch.Tensor  # merge-group permutation into window order
    window_segments: Segments
    image_segments: Segments
    positions: torch.Tensor  # [N, 2] (h, w) patch coordinates, window order


def vision_layout(grid_thw: torch.Tensor, cfg: VisionConfig, device=None) -> VisionLayout:
    """Window order, segments and rotary coordinates for a batch of images (same as HF's tower)."""
    m, ws = cfg.spatial_merge_size, cfg.window_merged
    window_index, window_lens, image_lens, positions = [], [], [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        # patch coordinates in the processor's 2x2-merge order
        hpos = torch.arange(h)[:, None].expand(h, w).reshape(gh, m, gw, m).permute(0, 2, 1, 3).reshape(-1, m * m)
        wpos = torch.arange(w)[None, :].expand(h, w).reshape(gh, m, gw, m).permute(0, 2, 1, 3).reshape(-1, m * m)
        coords = torch.stack([hpos, wpos], -1).repeat(t, 1, 1)  # [t*gh*gw, 4, 2] per merge group
        nh, nw = -(-gh // ws), -(-gw // ws)
        groups = torch.full((t, nh * ws, nw * ws), -1, dtype=torch.long)
        groups[:, :gh, :gw] = torch.arange(t * gh * gw).reshape(t, gh, gw)
        groups = groups.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        valid = groups >= 0
        window_lens += (valid.sum(1) * m * m).tolist()
        idx = groups[valid]
        window_index.append(idx + offset)
        positions.append(coords[idx].reshape(-1, 2))
        image_lens += [h * w] * t
        offset += t * gh * gw
    return VisionLayout(window_index=torch.cat(window_index).to(device),
                        window_segments=Segments.from_lengths(window_lens, device),
                        image_segments=Segments.from_lengths(image_lens, device),
                        positions=torch.cat(positions).to(device))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def segment_attention(q, k, v, segments: Segments) -> torch.Tensor:
    """Bidirectional attention within segments; q/k/v [N, heads, d] -> [N, heads, d]."""
    q, k, v = (t[segments.order] for t in (q, k, v))
    outs, start = [], 0
    for n, count in segments.groups:
        end = start + n * count
        qs, ks, vs = (t[start:end].view(count, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(end - start, *q.shape[1:]))
        start = end
    return torch.cat(outs)[segments.inverse]


class VisionAttention(MegatronModule):
    def __init__(self, config, vcfg: VisionConfig):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads_local = vcfg.num_heads // tp
        self.head_dim = vcfg.head_dim
        self.qkv = tensor_parallel.ColumnParallelLinear(
            vcfg.hidden_size, 3 * vcfg.hidden_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False)
        self.proj = tensor_parallel.RowParallelLinear(
            vcfg.hidden_size, vcfg.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x, cos, sin, segments: Segments):
        qkv, _ = self.qkv(x)
        q, k, v = qkv.view(x.shape[0], self.heads_local, 3, self.head_dim).unbind(2)
        dtype = q.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        out = segment_attention(q, k, v, segments)
        out, _ = self.proj(out.reshape(x.shape[0], -1))
        return out


class VisionBlock(MegatronModule):
    def __init__(self, config, vcfg: VisionConfig):
        super().__init__(config=config)
        self.norm1 = RMSNorm(config, vcfg.hidden_size, vcfg.norm_eps)
        self.attn = VisionAttention(config, vcfg)
        self.norm2 = RMSNorm(config, vcfg.hidden_size, vcfg.norm_eps)
        self.mlp = MLP(config, MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear,
                                             linear_fc2=tensor_parallel.RowParallelLinear))

    def forward(self, x, cos, sin, segments: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        out, bias = self.mlp(self.norm2(x))
        return x + (out if bias is None else out + bias)


class PatchMerger(MegatronModule):
    """RMSNorm per patch, concatenate each 2x2 group, MLP(4d -> 4d -> GELU -> llm hidden)."""

    def __init__(self, config, vcfg: VisionConfig, out_hidden: int):
        super().__init__(config=config)
        width = vcfg.hidden_size * vcfg.merge_unit
        self.width = width
        self.ln_q = RMSNorm(config, vcfg.hidden_size, vcfg.norm_eps)
        self.fc1 = tensor_parallel.ColumnParallelLinear(width, width, config=config, init_method=config.init_method,
                                                        bias=True, gather_output=False)
        self.fc2 = tensor_parallel.RowParallelLinear(width, out_hidden, config=config,
                                                     init_method=config.output_layer_init_method, bias=True,
                                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        h, _ = self.fc1(self.ln_q(x).view(-1, self.width))
        out, _ = self.fc2(F.gelu(h))
        return out


class VisionTower(MegatronModule):
    def __init__(self, config, vcfg: VisionConfig, out_hidden: int):
        super().__init__(config=config)
        self.vcfg = vcfg
        # Conv3d(3, D, kernel=stride=(2,14,14), no bias) over one patch == a linear over its 1176 values
        self.patch_embed = nn.Linear(vcfg.patch_dim, vcfg.hidden_size, bias=False, dtype=config.params_dtype)
        half = vcfg.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / vcfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half),
                             persistent=False)
        self.blocks = nn.ModuleList([VisionBlock(config, vcfg) for _ in range(vcfg.depth)])
        self.merger = PatchMerger(config, vcfg, out_hidden)
        self.full_blocks = set(vcfg.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dev = pixel_values.device
        layout = vision_layout(grid_thw.cpu(), self.vcfg, dev)
        unit = self.vcfg.merge_unit
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        n = x.shape[0]
        x = x.view(n // unit, unit, -1)[layout.window_index].reshape(n, -1)
        freqs = (layout.positions.float()[..., None] * self.inv_freq.to(dev)).flatten(1)  # [N, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # broadcast over heads
        cos, sin = emb.cos(), emb.sin()
        for i, block in enumerate(self.blocks):
            segs = layout.image_segments if i in self.full_blocks else layout.window_segments
            x = block(x, cos, sin, segs)
        merged = self.merger(x)
        return merged[torch.argsort(layout.window_index)]
