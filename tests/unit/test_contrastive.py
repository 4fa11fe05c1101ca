"""objectives/contrastive.py on one process: InfoNCE against a hand computation, hard-negative padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_moca.objectives.contrastive import ContrastiveConfig, info_nce, pad_hard_negatives


def test_info_nce_matches_a_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    p = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    n = F.normalize(torch.tensor([[[1.0, 1.0]], [[-1.0, 0.0]]]), dim=-1)
    t = 0.5
    loss, metrics = info_nce(q, p, n, ContrastiveConfig(temperature=t, hard_negatives=1))
    expected = 0.0
    for i in range(2):
        scores = [float(q[i] @ p[j]) / t for j in range(2)] + [float(q[i] @ n[i, 0]) / t]
        expected += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    assert metrics["accuracy"] == 0.5  # query 1 scores positive 0 (0.96) above its own (0.8)


def test_without_hard_negatives_the_logits_are_in_batch_only():
    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss, _ = info_nce(q, p, None, ContrastiveConfig(temperature=0.03))
    assert loss.item() == pytest.approx(F.cross_entropy(q @ p.T / 0.03, torch.arange(4)).item(), rel=1e-6)


def test_hard_negative_lists_are_padded_by_repeating_the_last():
    assert pad_hard_negatives([["a"], ["b", "c", "d"], ["e", "f"]], 2) == [["a", "a"], ["b", "c"], ["e", "f"]]
    with pytest.raises(ValueError, match="query 1 has no hard negative"):
        pad_hard_negatives([["a"], []], 2)
