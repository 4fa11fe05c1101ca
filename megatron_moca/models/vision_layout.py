"""Window layout of the Qwen2.5-VL vision tower, computed once per batch (pure torch, no megatron).

HF's tower permutes the 2x2 merge groups of every image into window order (4x4 merged tokens =
8x8 patches per window; partial windows at the right and bottom edges), attends within windows
(or within whole images in the full-attention blocks), and un-permutes after the merger. Here the
same permutation is computed once, and the attention segments are grouped by length so that each
group of equal-length segments is one batched attention call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_moca.config.model import VisionConfig


@dataclass
class Segments:
    """A partition of the (window-ordered) token sequence into attention segments, grouped by length.

    order: token permutation that makes each length group contiguous; inverse: its inverse. Both None
    when the tokens are already in that order (e.g. images whose sides are whole windows), which
    saves three gathers and a scatter per block.
    groups: (length, count) in the order the groups appear after `order`.
    """

    order: Optional[torch.Tensor]
    inverse: Optional[torch.Tensor]
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
        if torch.equal(order, torch.arange(len(order))):
            return cls(order=None, inverse=None, groups=groups)
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


def segment_attention(q, k, v, segments: Segments) -> torch.Tensor:
    """Bidirectional attention within segments; q/k/v [N, heads, d] -> [N, heads, d]."""
    if segments.order is not None:
        q, k, v = (t[segments.order] for t in (q, k, v))
    sizes = [n * count for n, count in segments.groups]
    # split, not slices: its backward is one cat, where each slice's is a zero-filled full-size gradient
    # plus a copy (and a lone group is used as it is)
    parts = zip(*(t.split(sizes) if len(sizes) > 1 else (t,) for t in (q, k, v)))
    outs = []
    for (n, count), group in zip(segments.groups, parts):
        qs, ks, vs = (t.view(count, n, *t.shape[1:]).transpose(1, 2) for t in group)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(n * count, *q.shape[1:]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if segments.inverse is None else out[segments.inverse]
