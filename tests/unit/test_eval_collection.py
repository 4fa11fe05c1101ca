"""Retrieval over several sets, through a stand-in embedder whose vectors are known, against pytrec_eval on the
same score matrices: per-set means, the means over the sets, the run file to the last bit of every score, and
the sharded embedder's gather order on 2 gloo ranks. Judgements are not the diagonal (query i -> document i),
sets have several queries each and differ in size, so a swapped index, a dropped query or a permutation
applied to one side shows."""

import hashlib
import os

import pytest
import torch

from helpers import pytrec_means
from megatron_moca.eval.beir import BeirData, Entry
from megatron_moca.eval.retrieval import Prompts, evaluate_collection, evaluate_retrieval


class KnownEmbedder:
    """embed(): a fixed unit vector per distinct input text (its sha256 seeds it), like a model would give."""

    dimension = 8
    device = torch.device("cpu")

    def vector(self, item) -> torch.Tensor:
        text = item if isinstance(item, str) else item["text"] + "|" + "|".join(map(str, item.get("images", [])))
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = torch.randn(self.dimension, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (v / v.norm()).float()

    def embed(self, items, batch_size=8, progress=None):
        return torch.stack([self.vector(i) for i in items]) if items else torch.zeros(0, self.dimension)


def a_set(name, queries, documents, seed):
    """A set with graded, non-diagonal judgements: every query judges 1..3 random documents with grades 0..2,
    one query judges only 0, one has no judgements at all (left out of the means)."""
    g = torch.Generator().manual_seed(seed)
    corpus = [Entry(f"{name}d{j}", f"{name} document {j} about topic {j % 3}") for j in range(documents)]
    qs = [Entry(f"q{i}", f"{name} question {i}") for i in range(queries)]
    qrels = {}
    for i, q in enumerate(qs):
        if i == queries - 1:
            continue
        judged = torch.randperm(documents, generator=g)[:1 + i % 3].tolist()
        qrels[q.id] = {corpus[j].id: float(0 if i == 1 else 1 + (j + i) % 2) for j in judged}
    return name, BeirData(corpus, qs, qrels), Prompts(query="query: {text}")


def scores_of(embedder, data, prompts):
    q = torch.stack([embedder.vector(prompts.query.format(text=e.text)) for e in data.queries])
    d = torch.stack([embedder.vector(prompts.document.format(text=e.text)) for e in data.corpus])
    return q @ d.T


def test_the_means_over_sets_are_the_means_of_each_sets_pytrec_eval_numbers(tmp_path):
    embedder = KnownEmbedder()
    sets = [a_set("a", 5, 9, 0), a_set("b", 7, 12, 1), a_set("c", 4, 6, 2)]
    result = evaluate_collection(embedder, sets)
    expected_sets = {}
    for name, data, prompts in sets:
        scores = scores_of(embedder, data, prompts)
        ids = ([e.id for e in data.queries], [e.id for e in data.corpus])
        expected = {}
        for k in (1, 5, 10):
            expected.update(pytrec_means(scores, *ids, data.qrels, k))
        expected_sets[name] = expected
        ours = result.metrics["sets"][name]
        assert ours["queries"] == len(data.queries) - 1 and ours["documents"] == len(data.corpus)
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), (name, key)
    for key in ("ndcg@5", "recall@10", "mrr@1", "ndcg@10"):
        assert result.metrics[key] == pytest.approx(sum(e[key] for e in expected_sets.values()) / 3, abs=1e-12)
    assert result.metrics["set_count"] == 3
    assert len(result.per_query) == sum(len(d.queries) - 1 for _, d, _ in sets)
    assert result.per_query["b/q3"] == evaluate_retrieval(embedder, sets[1][1], sets[1][2]).per_query["q3"]


def test_the_run_file_holds_every_score_exactly_in_trec_order(tmp_path):
    from megatron_moca.eval.outputs import write_outputs

    embedder = KnownEmbedder()
    name, data, prompts = a_set("a", 6, 11, 3)
    result = evaluate_retrieval(embedder, data, prompts)
    write_outputs(str(tmp_path / "out"), {"task": "retrieval", **result.metrics}, "t", result.per_query, result.run)
    scores = scores_of(embedder, data, prompts)
    lines = (tmp_path / "out" / "run.trec").read_text().splitlines()
    assert len(lines) == 6 * 11
    by_query = {}
    for line in lines:
        qid, q0, doc, rank, score, tag = line.split()
        by_query.setdefault(qid, []).append((int(rank), doc, float(score)))
        i, j = int(qid[1:]), int(doc[2:])
        assert q0 == "Q0" and tag == "moca" and float(score) == float(scores[i, j])  # exact, not rounded
    for qid, ranked in by_query.items():
        assert [r for r, _, _ in ranked] == list(range(1, 12))
        # score descending, equal scores by document id descending (trec_eval's order)
        assert all(a[2] > b[2] or (a[2] == b[2] and a[1] > b[1]) for a, b in zip(ranked, ranked[1:]))


class RecordingEmbedder(KnownEmbedder):
    """KnownEmbedder that notes each embed() call: (how many items, batch_size, progress label)."""

    def __init__(self):
        self.calls = []

    def embed(self, items, batch_size=8, progress=None):
        self.calls.append((len(items), batch_size, progress))
        return super().embed(items, batch_size, progress)


def _gather_worker(rank, world, init, items, out):
    import torch.distributed as dist

    from megatron_moca.eval.sharding import ShardedEmbedder

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        inner = RecordingEmbedder()
        sharded = ShardedEmbedder(inner)
        gathered = sharded.embed(items, batch_size=2, progress="queries")
        torch.save({"gathered": gathered, "calls": inner.calls, "dimension": sharded.dimension}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, count, shares", [(3, 4, [1, 1, 2]), (2, 1, [0, 1])])
def test_the_sharded_embedder_gathers_every_rank_share_back_in_order(world, count, shares, tmp_path):
    """Every rank gets all vectors in the original order; each embedded its contiguous share with the caller's
    batch size, and only rank 0 shows progress."""
    import torch.multiprocessing as mp

    items = [f"item {i}" for i in range(count)]
    out = str(tmp_path / "gathered.pt")
    mp.spawn(_gather_worker, args=(world, f"file://{tmp_path / 'rdzv'}", items, out), nprocs=world)
    for rank in range(world):
        result = torch.load(f"{out}.{rank}")
        assert torch.equal(result["gathered"], KnownEmbedder().embed(items)) and result["dimension"] == 8
        label = f"queries (rank 0 of {world})" if rank == 0 else None
        assert result["calls"] == [(shares[rank], 2, label)]
