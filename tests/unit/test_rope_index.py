"""get_rope_index (pure) equals transformers' Qwen2.5-VL get_rope_index for any mix of text and images."""

import random
import types

import pytest
import torch

from megatron_moca.models.rope_index import get_rope_index

IMG, VS, VE, PAD = 151655, 151652, 151653, 151643


def hf_rope_index(ids, grid, mask):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    fake = types.SimpleNamespace(config=Qwen2_5_VLConfig(), get_vision_position_ids=lambda *a, **k:
                                 Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k))
    return Qwen2_5_VLModel.get_rope_index(fake, ids, (ids == IMG).int(), grid, attention_mask=mask)


def random_batch(rng, rows, left_pad=False):
    seqs, grids = [], []
    for _ in range(rows):
        seq = [rng.randrange(1000) for _ in range(rng.randrange(0, 6))]
        for _ in range(rng.randrange(0, 4)):
            t, h, w = 1, 2 * rng.randrange(1, 9), 2 * rng.randrange(1, 9)
            seq += [VS] + [IMG] * (t * h * w // 4) + [VE] + [rng.randrange(1000) for _ in range(rng.randrange(0, 5))]
            grids.append((t, h, w))
        seqs.append(seq or [5])
    s = max(map(len, seqs)) + 2
    ids, mask = torch.full((rows, s), PAD), torch.zeros(rows, s, dtype=torch.long)
    for r, seq in enumerate(seqs):
        sl = slice(s - len(seq), s) if left_pad else slice(0, len(seq))
        ids[r, sl], mask[r, sl] = torch.tensor(seq), 1
    return ids, mask, (torch.tensor(grids) if grids else None)


@pytest.mark.parametrize("seed", range(12))
def test_matches_transformers(seed):
    rng = random.Random(seed)
    ids, mask, grid = random_batch(rng, rows=3, left_pad=seed % 2 == 1)
    ours, deltas = get_rope_index(ids, grid, attention_mask=mask)
    ref, ref_deltas = hf_rope_index(ids, grid, mask)
    valid = mask.bool()
    assert torch.equal(ours[:, valid], ref[:, valid])
    assert torch.equal(deltas.flatten(), ref_deltas.flatten())


def test_text_only_is_arange():
    ids = torch.arange(10).view(1, -1)
    pos, _ = get_rope_index(ids, None)
    assert torch.equal(pos, torch.arange(10).expand(3, 1, 10))


def test_image_positions_hand_computed():
    # "a <vs> [2x3 merged grid] <ve> b": image starts at 2, text resumes at 2 + max(2, 3) = 5
    ids = torch.tensor([[7, VS] + [IMG] * 6 + [VE, 8]])
    pos, _ = get_rope_index(ids, torch.tensor([[1, 4, 6]]))
    assert pos[:, 0, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 0, 2:8].tolist() == [2] * 6
    assert pos[1, 0, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 0, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 0, 8:].tolist() == [[5, 6]] * 3


def test_packed_documents_restart_positions():
    rng = random.Random(3)
    a, _, ga = random_batch(rng, 1)
    b, _, gb = random_batch(rng, 1)
    a, b = a[a != PAD].view(1, -1), b[b != PAD].view(1, -1)
    packed = torch.cat([a, b, torch.full((1, 3), PAD)], dim=1)
    docs = torch.cat([torch.zeros_like(a), torch.ones_like(b), torch.full((1, 3), -1)], dim=1)
    grids = [g for g in (ga, gb) if g is not None]
    pos, _ = get_rope_index(packed, torch.cat(grids) if grids else None, document_ids=docs)
    pa, _ = get_rope_index(a, ga)
    pb, _ = get_rope_index(b, gb)
    assert torch.equal(pos[:, :, :a.shape[1]], pa)
    assert torch.equal(pos[:, :, a.shape[1]:a.shape[1] + b.shape[1]], pb)
    assert int(pos[:, :, -3:].abs().sum()) == 0


def test_inconsistent_grids_raise():
    ids = torch.tensor([[VS] + [IMG] * 4 + [VE]])
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows"):
        get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 2, 2]]))
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> tokens"):
        get_rope_index(ids, None)
