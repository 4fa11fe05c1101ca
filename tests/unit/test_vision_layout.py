"""Window layout of the vision tower equals transformers' (window index, window and image segments,
rotary coordinates), and grouped segment attention equals attention run segment by segment."""

import pytest
import torch
import torch.nn.functional as F

from megatron_moca.config.model import VisionConfig
from megatron_moca.models.vision_layout import Segments, vision_layout

GRIDS = [[[1, 16, 16]], [[1, 6, 10], [1, 4, 4], [1, 20, 18]], [[1, 14, 22]], [[2, 8, 12], [1, 2, 2]], [[1, 34, 2]]]


@pytest.mark.parametrize("grids", GRIDS)
def test_matches_transformers_window_index(grids):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    cfg = VisionConfig()
    grid = torch.tensor(grids)
    ours = vision_layout(grid, cfg)
    ref_index, ref_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert torch.equal(ours.window_index, ref_index)
    lengths = [n for n, count in ours.window_segments.groups for _ in range(count)]
    assert sorted(lengths) == sorted((ref_cu[1:] - ref_cu[:-1]).tolist())
    ref_pos = get_vision_position_ids(grid, 2)  # [N, 2] in processor order
    permuted = ref_pos.view(-1, 4, 2)[ref_index].reshape(-1, 2)
    assert torch.equal(ours.positions, permuted)
    assert sum(n * c for n, c in ours.image_segments.groups) == int(grid.prod(-1).sum())


def test_grouping_puts_equal_lengths_in_one_call():
    segs = Segments.from_lengths([64, 64, 32, 64, 32, 16])
    assert segs.groups == [(64, 3), (32, 2), (16, 1)]
    assert torch.equal(segs.order[segs.inverse], torch.arange(272))


def test_segments_already_in_order_need_no_permutation():
    assert Segments.from_lengths([64, 64, 64]).order is None
    assert Segments.from_lengths([64, 64, 32, 32]).order is None
    assert Segments.from_lengths([64, 32, 64]).order is not None


@pytest.mark.parametrize("lengths", [[64, 16, 64, 40, 16], [32, 32, 8]])
def test_segment_attention_equals_per_segment_loop(lengths):
    from megatron_moca.models.vision_layout import segment_attention

    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    got = segment_attention(q, k, v, Segments.from_lengths(lengths))
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(*(t[sl].transpose(0, 1) for t in (q, k, v))).transpose(0, 1))
        start += n
    assert torch.allclose(got, torch.cat(outs), atol=1e-6)
