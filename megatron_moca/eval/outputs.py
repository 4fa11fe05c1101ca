"""What `moca eval --output DIR` leaves for other tools to read:

    results.json      the metrics of the last stdout line (one JSON object)
    per_query.jsonl   retrieval: {"query_id", metric: value, ...} per evaluated query
    run.trec          retrieval: standard TREC run lines `qid Q0 docid rank score tag`, the top 100 per
                      query in trec_eval's order, scores as computed - trec_eval / pytrec_eval read it
    results.md        a table of the metrics
The folder is built in a staging folder and renamed when complete; it is written only where it is new,
empty, or an earlier `moca eval --output` with nothing else in it (ownership.py): never over a user's files.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from megatron_moca import ownership

RUN_DEPTH = 100


def write_outputs(folder: str, metrics: Dict[str, object], title: str,
                  per_query: Optional[Dict[str, Dict[str, float]]] = None,
                  run: Optional[List[tuple]] = None, tag: str = "moca") -> str:
    """Write the files above (run: (query id, [(doc id, score), ...] in rank order) per query)."""
    ownership.check_replaceable(folder)
    staging = ownership.staging(folder, "moca eval")
    with open(os.path.join(staging, "results.json"), "w") as f:
        json.dump(metrics, f, indent=1, allow_nan=False)
    if per_query is not None:
        with open(os.path.join(staging, "per_query.jsonl"), "w") as f:
            f.writelines(json.dumps({"query_id": qid, **values}, allow_nan=False) + "\n" for qid, values in per_query.items())
    if run is not None:
        with open(os.path.join(staging, "run.trec"), "w") as f:
            for qid, ranked in run:
                f.writelines(f"{qid} Q0 {doc} {rank} {score!r} {tag}\n"
                             for rank, (doc, score) in enumerate(ranked[:RUN_DEPTH], 1))
    with open(os.path.join(staging, "results.md"), "w") as f:
        f.write(f"# {title}\n\n| metric | value |\n|---|---|\n")
        for key, value in flat_metrics(metrics).items():
            f.write(f"| {key} | {value:.4f} |\n" if isinstance(value, float) else f"| {key} | {value} |\n")
    return ownership.publish(staging, folder)


def flat_metrics(metrics: Dict[str, object], prefix: str = "") -> Dict[str, object]:
    """Nested metrics as one level, keys joined with "/" (meta_tasks/vqa, subsets/DocVQA)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
