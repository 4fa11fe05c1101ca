"""eval/metrics.py and eval/beir.py: metrics against hand computations, BEIR folders and their errors."""

import json
import math

import pytest
import torch

from helpers import pytrec_means
from megatron_moca.errors import UserError
from megatron_moca.eval.beir import read_beir
from megatron_moca.eval.metrics import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics


def test_metrics_by_hand():
    ranked = ["d3", "d1", "d2", "d4"]
    relevant = {"d1": 2.0, "d2": 1.0, "d9": 0.0}
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 2) == 0.5 and recall_at_k(ranked, relevant, 3) == 1.0
    assert mrr_at_k(ranked, relevant, 5) == 0.5 and mrr_at_k(ranked, relevant, 1) == 0.0


def test_retrieval_metrics_rank_by_score_and_skip_unjudged_queries():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.5, 0.5, 0.5]])
    qrels = {"q0": {"a": 1}, "q1": {"a": 1}}  # q2 has no judgement
    out = retrieval_metrics(scores, ["q0", "q1", "q2"], ["a", "b", "c"], qrels, ks=(1, 3))
    assert out["queries"] == 2 and out["documents"] == 3
    assert out["recall@1"] == 0.5 and out["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)


def write_beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)


def test_beir_folder_and_its_errors(tmp_path):
    good = tmp_path / "good"
    write_beir(good, [{"_id": "d1", "text": "a page"}], [{"_id": "q1", "text": "a question"}], "q1\td1\t1\n")
    data = read_beir(str(good))
    assert [e.id for e in data.corpus] == ["d1"] and data.qrels == {"q1": {"d1": 1.0}}
    cases = [
        ([{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], "q1\td7\t1\n", "the corpus lacks, e.g. ['d7']"),
        ([{"_id": "d1", "image": "missing.png"}], [{"_id": "q1", "text": "y"}], "q1\td1\t1\n", "image missing.png under .*: missing"),
        ([{"text": "no id"}], [{"_id": "q1", "text": "y"}], "q1\td1\t1\n", "not a BEIR record with an _id"),
        ([{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}], "q1\td1\thigh\n", "score 'high' is not a number"),
    ]
    for i, (corpus, queries, qrels, message) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        write_beir(folder, corpus, queries, qrels)
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_beir(str(folder))
    with pytest.raises(UserError, match="corpus.jsonl does not exist"):
        read_beir(str(tmp_path / "none"))


def test_vidore_style_parquet_with_image_bytes(tmp_path):
    """ViDoRe-v2's column names (corpus-id, query-id, query) and parquet image structs are read as is."""
    import io

    from PIL import Image

    pa = pytest.importorskip("pyarrow")  # the dev extra installs it (CI); parquet reading needs it
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(buffer, format="PNG")
    page = {"bytes": buffer.getvalue(), "path": "page.png"}
    pq.write_table(pa.Table.from_pylist([{"corpus-id": 7, "image": page}]), tmp_path / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist([{"query-id": 3, "query": "red page", "language": "en"}]),
                   tmp_path / "queries.parquet")
    pq.write_table(pa.Table.from_pylist([{"query-id": 3, "corpus-id": 7, "score": 1}]), tmp_path / "qrels.parquet")
    data = read_beir(str(tmp_path))
    assert data.corpus[0].id == "7" and data.corpus[0].image == page["bytes"]
    assert data.queries[0].text == "red page" and data.qrels == {"3": {"7": 1.0}}


def test_cut_offs_pinned_by_hand():
    """3 relevant documents, one ranked first: recall@1 = 1/3 (not 1/min(3, k)), nDCG@1 = 1 (the ideal DCG
    is cut at k too); a query judged only 0 counts, with 0; one without judgements does not."""
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.2], [0.9, 0.1, 0.5, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5]])
    qrels = {"q0": {"a": 1, "d": 1, "e": 1}, "q1": {"a": 0, "b": 0}}  # q2: no judgements
    out = retrieval_metrics(scores, ["q0", "q1", "q2"], ["a", "b", "c", "d", "e"], qrels, ks=(1, 5))
    assert out["queries"] == 2
    assert out["recall@1"] == pytest.approx((1 / 3 + 0) / 2) and out["ndcg@1"] == pytest.approx((1.0 + 0) / 2)
    assert out["recall@5"] == pytest.approx((1 + 0) / 2) and out["mrr@1"] == pytest.approx(0.5)


def test_ties_rank_by_document_id_descending_as_trec_eval():
    scores = torch.tensor([[0.5, 0.5, 0.5]])
    out = retrieval_metrics(scores, ["q"], ["a", "b", "c"], {"q": {"a": 1}}, ks=(1, 3))
    assert out["mrr@3"] == pytest.approx(1 / 3) and out["recall@1"] == 0.0  # c, b, a


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_pytrec_eval_on_ties_zero_judged_and_graded_qrels(seed):
    g = torch.Generator().manual_seed(seed)
    n_q, n_d = 30, 40
    doc_ids = [f"doc{j:02d}" for j in torch.randperm(n_d, generator=g).tolist()]
    query_ids = [f"q{i}" for i in range(n_q)]
    scores = torch.randint(0, 6, (n_q, n_d), generator=g).float() / 5  # few values: many ties
    qrels = {}
    for i, q in enumerate(query_ids):
        if i % 7 == 3:
            continue  # no judgements: not evaluated
        judged = torch.randperm(n_d, generator=g)[:int(torch.randint(1, 8, (1,), generator=g))].tolist()
        grades = torch.randint(-1, 4, (len(judged),), generator=g).tolist()  # -1, 0 (judged only 0 too), 1..3
        if i % 5 == 0:
            grades = [0] * len(grades)
        qrels[q] = {doc_ids[j]: float(x) for j, x in zip(judged, grades)}
    for k in (1, 5, 10):
        ours = retrieval_metrics(scores, query_ids, doc_ids, qrels, ks=(k,))
        theirs = pytrec_means(scores, query_ids, doc_ids, qrels, k)
        assert ours["queries"] == theirs["queries"]
        for key in (f"ndcg@{k}", f"recall@{k}", f"mrr@{k}"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12), (k, key, ours[key], theirs[key])


def test_mmeb_groups_are_mmebs_36_sets_and_their_means():
    from megatron_moca.eval.mmeb import IN_DISTRIBUTION, META_TASKS, grouped_means

    names = [n for group in META_TASKS.values() for n in group]
    assert len(names) == len(set(names)) == 36 and [len(g) for g in META_TASKS.values()] == [10, 10, 12, 4]
    assert len(IN_DISTRIBUTION) == 20 and IN_DISTRIBUTION < set(names)
    hits = {"ImageNet-1K": 0.8, "Place365": 0.4, "DocVQA": 0.6, "MSCOCO": 1.0, "RefCOCO": 0.5, "MySet": 0.0}
    out = grouped_means(hits)
    assert out["meta_tasks"] == {"classification": pytest.approx(0.6), "vqa": 0.6, "grounding": 0.75}
    assert out["in_distribution"] == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    assert out["out_of_distribution"] == pytest.approx((0.4 + 0.5) / 2)  # MySet is not MMEB's: in no group
    assert grouped_means({"MySet": 1.0}) == {}


def test_the_default_cut_offs_are_one_five_and_ten():
    """`moca eval` reports k = 1, 5 and 10 (BEIR's and ViDoRe's): every metric at exactly those cut-offs."""
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    out = retrieval_metrics(scores, ["q0", "q1"], ["d0", "d1"], {"q0": {"d0": 1.0}, "q1": {"d0": 1.0}})
    assert sorted(k for k in out if "@" in k) == sorted(f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in (1, 5, 10))
    assert out["mrr@1"] == 0.5 and out["mrr@5"] == 0.75 and out["queries"] == 2 and out["documents"] == 2
