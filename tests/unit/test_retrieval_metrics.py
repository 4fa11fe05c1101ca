"""eval/metrics.py and eval/beir.py: metrics against hand computations, BEIR folders and their errors."""

import json
import math

import pytest
import torch

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
