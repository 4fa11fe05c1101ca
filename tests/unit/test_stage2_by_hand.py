"""Stage 2's pieces against independent computations, not against another layout of the same code: the
contrastive step's loss over hard-negative indices (repeats, missing lists, a rank without negatives) by
explicit loops; the optimizer's weight-decay groups by parameter; tokens and FLOPs of a global batch equal
whether one rank or two build it."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_moca.objectives.contrastive import ContrastiveConfig, hard_negative_index
from megatron_moca.training.contrastive_step import ContrastiveStep


def loop_loss(q, p, negatives_per_query, t):
    """Mean over queries of -log softmax at the own positive, logits = every positive, then the query's own
    hard negatives (as a list of vectors; an empty list adds nothing), all / t - written out by hand."""
    total, correct = 0.0, 0
    for i in range(len(q)):
        logits = [float(q[i] @ p[j]) / t for j in range(len(p))] + [float(q[i] @ n) / t for n in negatives_per_query[i]]
        top = max(logits)
        total += -(logits[i] - top) + math.log(sum(math.exp(x - top) for x in logits))
        correct += int(max(range(len(logits)), key=lambda j: logits[j]) == i)
    return total / len(q), correct / len(q)


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=-1).float()


@pytest.mark.parametrize("counts, k", [([2, 0, 1, 3], 2), ([1, 1, 1, 1], 3), ([0, 0, 0, 0], 1), ([4, 2, 0, 1], 3)])
def test_the_contrastive_step_loss_equals_the_loops(counts, k):
    q, p = unit(4, 6, seed=1), unit(4, 6, seed=2)
    n = unit(sum(min(c, k) for c in counts), 6, seed=3)  # each query's list, cut to k, embedded once
    index = hard_negative_index(counts, k)
    step = ContrastiveStep(None, ContrastiveConfig(temperature=0.07, hard_negatives=k), torch.device("cpu"), False)
    loss, metrics = step.loss(index, q, p, n if len(n) else None)
    lists, offset = [], 0
    for c in counts:
        used = list(n[offset:offset + min(c, k)])
        offset += min(c, k)
        lists.append(used + [used[-1]] * (k - len(used)) if used else [])  # the reference repeats the last one
    expected, accuracy = loop_loss(q, p, lists, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == accuracy and metrics["contrastive_loss"] == pytest.approx(expected, rel=1e-5)


def test_a_rank_with_no_hard_negatives_scores_in_batch_only():
    q, p = unit(3, 5, seed=4), unit(3, 5, seed=5)
    index = hard_negative_index([0, 0, 0], 2)
    step = ContrastiveStep(None, ContrastiveConfig(temperature=0.05, hard_negatives=2), torch.device("cpu"), False)
    loss, _ = step.loss(index, q, p, torch.zeros(0, 5))
    assert loss.item() == pytest.approx(loop_loss(q, p, [[], [], []], 0.05)[0], rel=1e-5)


def test_weight_decay_applies_to_matrices_only():
    from megatron_moca.config.finetune import FinetuneConfig
    from megatron_moca.training.finetune import _optimizer

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                                torch.nn.Conv2d(1, 2, 3))
    cfg = FinetuneConfig()
    cfg.optim.weight_decay, cfg.optim.lr = 0.05, 1e-3
    cfg.parallel.use_distributed_optimizer = False  # one process: plain AdamW (ZeRO-1 takes the same groups)
    optimizer = _optimizer(cfg, list(model.parameters()), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert groups == {0.05: ["0.weight", "1.weight", "3.weight"], 0.0: ["1.bias", "2.bias", "2.weight", "3.bias"]}
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)


def test_tokens_and_flops_of_a_global_batch_do_not_depend_on_how_it_is_split(tmp_path):
    """The same global batch built by one rank, by two, and in GradCache chunks of one input: the same tokens
    and the same model FLOPs (GradCache's extra forward counted on top: 4/3)."""
    from helpers import write_pairs
    from megatron_moca.conversion.hf_config import hf_config_from_model, model_config_from_hf
    from megatron_moca.config.model import preset
    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.data.pairs import BatchPlan, PairsData, PairsDataConfig
    from megatron_moca.embed.inputs import EmbeddingInputs
    from megatron_moca.training.contrastive_batches import ContrastiveSteps
    from megatron_moca.training.finetune import _step_flops

    data = PairsData(PairsDataConfig(paths=[write_pairs(tmp_path / "pairs", text_rows=4, image_rows=4)]))
    plan = BatchPlan(data.subset_sizes(), 4, "mixed", 0)
    inputs = EmbeddingInputs(None, max_length=64, image=ImageProcessingConfig(min_pixels=3136, max_pixels=6272))
    model_cfg = model_config_from_hf(hf_config_from_model(preset("tiny")))
    totals = {}
    for name, dp, chunk in (("one", 1, None), ("two", 2, None), ("chunked", 1, 1)):
        tokens = flops = 0.0
        for rank in range(dp):
            step = ContrastiveSteps(data, plan, inputs, rank, dp, 2, 2, chunk)[1]
            tokens += step["tokens"]
            flops += _step_flops(model_cfg, step, grad_cache=chunk is not None)
        totals[name] = (tokens, flops)
    assert totals["one"][0] == totals["two"][0] == totals["chunked"][0] > 0
    assert totals["one"][1] == pytest.approx(totals["two"][1], rel=1e-12)
    assert totals["chunked"][1] == pytest.approx(totals["one"][1] * 4 / 3, rel=1e-12)
