"""Retrieval metrics over a query x document score matrix and graded relevance judgements (qrels),
as BEIR / pytrec_eval define them: nDCG@k (log2 discount, graded gains), Recall@k, MRR@k."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch


def ndcg_at_k(ranked: Sequence[str], relevant: Dict[str, float], k: int) -> float:
    dcg = sum(relevant.get(doc, 0.0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Dict[str, float], k: int) -> float:
    wanted = {doc for doc, g in relevant.items() if g > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Dict[str, float], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0.0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def retrieval_metrics(scores: torch.Tensor, query_ids: List[str], doc_ids: List[str],
                      qrels: Dict[str, Dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Mean metrics over the queries that have a positive judgement; scores [n_queries, n_docs]."""
    top = min(max(ks), len(doc_ids))
    order = scores.topk(top, dim=1).indices.tolist()
    totals: Dict[str, float] = {}
    judged = 0
    for qi, qid in enumerate(query_ids):
        relevant = qrels.get(qid, {})
        if not any(g > 0 for g in relevant.values()):
            continue
        judged += 1
        ranked = [doc_ids[d] for d in order[qi]]
        for k in ks:
            for name, fn in (("ndcg", ndcg_at_k), ("recall", recall_at_k), ("mrr", mrr_at_k)):
                totals[f"{name}@{k}"] = totals.get(f"{name}@{k}", 0.0) + fn(ranked, relevant, k)
    out = {key: value / judged for key, value in sorted(totals.items())} if judged else {}
    out["queries"] = judged
    out["documents"] = len(doc_ids)
    return out
