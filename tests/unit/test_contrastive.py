"""objectives/contrastive.py on one process: InfoNCE against a hand computation, hard-negative padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_moca.objectives.contrastive import ContrastiveConfig, hard_negative_index, info_nce


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
    # lists of 1, 3, 0 and 2 negatives; embedded once each, cut to k = 2: [a | b c | - | e f]
    index = hard_negative_index([1, 3, 0, 2], 2)
    assert index.tolist() == [[0, 0], [1, 2], [-1, -1], [3, 4]]


def test_queries_without_hard_negatives_score_only_in_batch():
    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    n = F.normalize(torch.randn(2, 2, 8), dim=-1)
    mask = torch.tensor([[True, True], [False, False]])
    loss, _ = info_nce(q, p, n, ContrastiveConfig(temperature=0.1), negative_mask=mask)
    logits0 = torch.cat([q[0] @ p.T, n[0] @ q[0]]) / 0.1
    logits1 = (q[1] @ p.T) / 0.1
    expected = (F.cross_entropy(logits0[None], torch.tensor([0])) + F.cross_entropy(logits1[None], torch.tensor([1]))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
