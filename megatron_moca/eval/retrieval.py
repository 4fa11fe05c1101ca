"""Retrieval evaluation of an embedder on BEIR-format data (`moca eval --task retrieval | vidore`).

Queries and documents are embedded with MoCa's prompts (spec moca-method.md, "Prompts"; `<img>` marks
where an entry's image goes), scored by cosine similarity, and ranked over the whole corpus.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List

from megatron_moca.embed.inputs import embedder_input
from megatron_moca.eval.beir import BeirData, Entry
from megatron_moca.eval.metrics import mean_metrics, per_query_metrics, rankings


@dataclass
class Prompts:
    """Templates: {text} is the entry's text, <img> its image (entries without an image drop <img>)."""

    query: str = "{text}"
    document: str = "{text}"
    image_document: str = "<img>\nRepresent the given document image."


TASK_PROMPTS = {
    "retrieval": Prompts(),
    "vidore": Prompts(query="{text}", image_document="<img>\nRepresent the given document image."),
}


PROMPTS_FILE = "moca_prompts.json"


def dataset_prompts(folder: str, default: Prompts) -> Prompts:
    """The prompts a data folder asks for in its moca_prompts.json (stand-ins built here write one), else default."""
    import os

    from megatron_moca.errors import UserError
    from megatron_moca.safe_load import load_json

    path = os.path.join(folder, PROMPTS_FILE)
    if not os.path.isfile(path):
        return default
    given = load_json(path)
    names = {f.name for f in dataclasses.fields(Prompts)}
    if not isinstance(given, dict) or set(given) - names or not all(isinstance(v, str) for v in given.values()):
        raise UserError(f"{path}: expected an object of strings with keys among {sorted(names)}")
    for key, template in given.items():
        check_template(template, f"{path}: {key}")
    return dataclasses.replace(default, **given)


def check_template(template: str, where: str) -> None:
    """A prompt template may name only {text}; anything else is a one-line error, not a KeyError later."""
    import string

    from megatron_moca.errors import UserError

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise UserError(f"{where}: not a valid template ({e}): {template[:80]!r}") from None
    if fields - {"text"}:
        raise UserError(f"{where}: unknown field(s) {sorted(fields - {'text'})} in {template[:80]!r}; "
                        "templates may use only {text}")


def _item(entry: Entry, template: str):
    return embedder_input(template.format(text=entry.text), entry.image, "<img>")


@dataclass
class RetrievalResult:
    metrics: Dict[str, object]
    """BEIR's means (the line `moca eval` prints) and the prompts they were measured with."""
    per_query: Dict[str, Dict[str, float]]
    """Each evaluated query's metrics."""
    run: List[tuple]
    """(query id, [(document id, score), ...]) in trec_eval's rank order, the top RUN_DEPTH."""


def evaluate_collection(embedder, sets: List[tuple], batch_size: int = 8, log=None) -> RetrievalResult:
    """Each (name, BeirData, Prompts) evaluated alone; metrics per set plus the sets' mean of each metric
    (ViDoRe's summary: the mean nDCG@5 over its sets); per-query results and run lines carry "set/qid"."""
    per_set, per_query, run = {}, {}, []
    for name, data, prompts in sets:
        if log:
            log(f"[{name}]")
        result = evaluate_retrieval(embedder, data, prompts, batch_size=batch_size, log=log)
        per_set[name] = result.metrics
        per_query.update({f"{name}/{qid}": values for qid, values in result.per_query.items()})
        run += [(f"{name}/{qid}", ranked) for qid, ranked in result.run]
        if log:
            log(f"[{name}] ndcg@5 {result.metrics['ndcg@5']:.4f}")
    keys = [k for k, v in next(iter(per_set.values())).items() if isinstance(v, float)]
    means = {k: sum(m[k] for m in per_set.values()) / len(per_set) for k in keys}
    return RetrievalResult({**means, "set_count": len(per_set), "sets": per_set}, per_query, run)


def evaluate_retrieval(embedder, data: BeirData, prompts: Prompts = Prompts(), batch_size: int = 8,
                       log=None) -> RetrievalResult:
    from megatron_moca.eval.outputs import RUN_DEPTH

    queries = [_item(q, prompts.query) for q in data.queries]
    documents = [_item(d, prompts.image_document if d.image else prompts.document) for d in data.corpus]
    if log:
        log(f"embedding {len(queries)} queries and {len(documents)} documents")
    q = embedder.embed(queries, batch_size=batch_size, progress="queries")
    d = embedder.embed(documents, batch_size=batch_size, progress="documents")
    scores = q @ d.T
    query_ids, doc_ids = [e.id for e in data.queries], [e.id for e in data.corpus]
    order = rankings(scores, doc_ids, min(max(RUN_DEPTH, 10), len(doc_ids)))
    per_query = per_query_metrics(scores, query_ids, doc_ids, data.qrels, order=order)
    run = [(qid, [(doc_ids[j], float(scores[i, j])) for j in order[i]]) for i, qid in enumerate(query_ids)]
    # the prompts go with the scores (results.json, moca_results.json, the card): a score is reproducible
    return RetrievalResult({**mean_metrics(per_query, len(doc_ids)), "prompts": dataclasses.asdict(prompts)},
                           per_query, run)
