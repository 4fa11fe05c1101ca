"""Retrieval metrics over a query x document score matrix and graded relevance judgements (qrels),
exactly as trec_eval / pytrec_eval compute them and BEIR averages them (tested against pytrec_eval):

  * ranking: score, descending; equal scores by document id, descending (trec_eval's tie order);
  * nDCG@k: gain = the grade where it is positive (negative grades count 0), log2 discount, the ideal
    DCG from the positive grades cut at k;
  * Recall@k: relevant (grade >= 1, trec_eval's relevance level) documents in the top k over ALL the
    query's relevant documents (a query with 3 relevant, one ranked first, has recall@1 = 1/3);
  * MRR@k: 1 / rank of the first relevant document within the top k (BEIR's MRR@k);
  * the mean runs over every query that has judgements, those judged only 0 (or negative) included
    with 0, as BEIR averages pytrec_eval's per-query results; queries without judgements are left out.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import torch

RELEVANCE_LEVEL = 1.0  # trec_eval's default: grades >= 1 are relevant for recall and MRR


def ndcg_at_k(ranked: Sequence[str], relevant: Dict[str, float], k: int) -> float:
    dcg = sum(max(relevant.get(doc, 0.0), 0.0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Dict[str, float], k: int) -> float:
    wanted = {doc for doc, g in relevant.items() if g >= RELEVANCE_LEVEL}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Dict[str, float], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0.0) >= RELEVANCE_LEVEL:
            return 1.0 / (i + 1)
    return 0.0


def rankings(scores: torch.Tensor, doc_ids: List[str], depth: int) -> List[List[int]]:
    """Each query's top `depth` document indices in trec_eval's order (score descending, then document
    id descending)."""
    by_id = np.empty(len(doc_ids), dtype=np.int64)
    by_id[np.argsort(np.array(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    values = scores.detach().double().cpu().numpy()
    return [np.lexsort((-by_id, -row))[:depth].tolist() for row in values]


def per_query_metrics(scores: torch.Tensor, query_ids: List[str], doc_ids: List[str],
                      qrels: Dict[str, Dict[str, float]], ks: Sequence[int] = (1, 5, 10),
                      order: List[List[int]] = None) -> Dict[str, Dict[str, float]]:
    """query id -> its metrics, for every query that has judgements (see the module docstring)."""
    order = order if order is not None else rankings(scores, doc_ids, min(max(ks), len(doc_ids)))
    out: Dict[str, Dict[str, float]] = {}
    for qi, qid in enumerate(query_ids):
        if qid not in qrels or not qrels[qid]:
            continue
        relevant = qrels[qid]
        ranked = [doc_ids[d] for d in order[qi]]
        out[qid] = {f"{name}@{k}": fn(ranked, relevant, k) for k in ks
                    for name, fn in (("ndcg", ndcg_at_k), ("recall", recall_at_k), ("mrr", mrr_at_k))}
    return out


def mean_metrics(per_query: Dict[str, Dict[str, float]], documents: int) -> Dict[str, float]:
    """BEIR's average over the evaluated queries, plus their count and the corpus size."""
    keys = sorted({k for m in per_query.values() for k in m})
    out = {k: sum(m[k] for m in per_query.values()) / len(per_query) for k in keys} if per_query else {}
    out["queries"] = len(per_query)
    out["documents"] = documents
    return out


def retrieval_metrics(scores: torch.Tensor, query_ids: List[str], doc_ids: List[str],
                      qrels: Dict[str, Dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Mean metrics over the queries that have judgements; scores [n_queries, n_docs]."""
    return mean_metrics(per_query_metrics(scores, query_ids, doc_ids, qrels, ks), len(doc_ids))
