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


class LinearEncoder(torch.nn.Module):
    """A stand-in encoder: batch["x"] [n, 4] -> L2-normalised W x (an embedder's contract: one unit vector per row)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, batch):
        return F.normalize(batch["x"] @ self.weight.T, dim=-1)


def chunks(rows, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({"x": rows[start:start + size]})
        start += size
    return out


@pytest.mark.parametrize("with_negatives", [True, False])
def test_one_chunk_per_group_is_a_plain_backward_and_more_run_grad_cache_to_the_same_gradients(with_negatives):
    """The step on whole groups (no GradCache) equals the loops' loss; split into chunks it runs GradCache and
    gives the same loss and gradient - both computed through the step's own call, not its pieces."""
    g = torch.Generator().manual_seed(7)
    q, p, n = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), torch.randn(3, 4, generator=g)
    counts = [1, 0, 2, 0] if with_negatives else [0, 0, 0, 0]
    index = hard_negative_index(counts, 2)
    results = {}
    for name, sizes in (("whole", (4,)), ("chunked", (1, 3))):
        encoder = LinearEncoder()
        step = ContrastiveStep(encoder, ContrastiveConfig(temperature=0.05, hard_negatives=2), torch.device("cpu"),
                               False)
        batch = {"negative_index": index, "queries": chunks(q, sizes), "positives": chunks(p, sizes),
                 "negatives": chunks(n, (3,) if name == "whole" else (2, 1)) if with_negatives else []}
        loss, metrics, chunked = step(batch)
        results[name] = (loss.item(), encoder.weight.grad.clone(), chunked)
    assert results["whole"][2] is False and results["chunked"][2] is True
    assert results["chunked"][0] == pytest.approx(results["whole"][0], rel=1e-6)
    assert torch.allclose(results["chunked"][1], results["whole"][1], atol=1e-6)
    with torch.no_grad():
        encoder = LinearEncoder()
        qe, pe, ne = (encoder({"x": x}) for x in (q, p, n))
    lists = [[ne[0], ne[0]], [], [ne[1], ne[2]], []] if with_negatives else [[], [], [], []]
    assert results["whole"][0] == pytest.approx(loop_loss(qe, pe, lists, 0.05)[0], rel=1e-5)


def _pad_worker(rank, init, out):
    import json

    import torch.distributed as dist

    from megatron_moca.training.contrastive_step import pad_negative_chunks

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        real = [{"input_ids": torch.full((2, 3), rank + 5)}] * (1 if rank == 0 else 3)
        step = {"negative_index": torch.zeros(1, 1), "negatives": real, "queries": []}
        padded = pad_negative_chunks(step, torch.device("cpu"))
        with open(f"{out}.{rank}", "w") as f:
            json.dump([c["input_ids"].tolist() for c in padded["negatives"]], f)
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_as_many_negative_chunks_as_the_rank_with_most_padding_after_its_own(tmp_path):
    import json

    import torch.multiprocessing as mp

    from megatron_moca.training.contrastive_step import pad_negative_chunks, padding_chunk

    out = str(tmp_path / "chunks")
    mp.spawn(_pad_worker, args=(f"file://{tmp_path / 'rdzv'}", out), nprocs=2)
    first, second = (json.load(open(f"{out}.{rank}")) for rank in range(2))
    pad = padding_chunk()["input_ids"].tolist()
    assert first == [[[5, 5, 5]] * 2, pad, pad] and second == [[[6, 6, 6]] * 2] * 3
    alone = {"negatives": [{"input_ids": torch.ones(1, 1)}]}
    assert pad_negative_chunks(alone, torch.device("cpu")) is alone  # no process group: nothing to match


def test_a_padding_chunk_is_one_valid_text_token_at_position_zero():
    from megatron_moca.training.contrastive_step import padding_chunk

    chunk = padding_chunk()
    assert chunk["input_ids"].tolist() == [[0]] and chunk["valid"].tolist() == [[True]]
    assert chunk["position_ids"].shape == (3, 1, 1) and not chunk["position_ids"].any()  # M-RoPE: 3 axes
    assert chunk["pixel_values"] is None and chunk["image_grid_thw"] is None
