"""BEIR-format retrieval data (the layout ViDoRe-v2 and most text benchmarks ship in):

    corpus.jsonl     {"_id": str, "text": str, "image": "relative/path.png" (optional)}
    queries.jsonl    {"_id": str, "text": str, "image": ... (optional)}
    qrels/test.tsv   query-id <tab> corpus-id <tab> score   (a header line)
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_moca.errors import UserError


@dataclass
class Entry:
    id: str
    text: str
    image: Optional[str] = None  # absolute path


@dataclass
class BeirData:
    corpus: List[Entry]
    queries: List[Entry]
    qrels: Dict[str, Dict[str, float]]


def _read_jsonl(path: str, folder: str) -> List[Entry]:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist (BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                entry = Entry(str(row["_id"]), str(row.get("text") or ""), row.get("image"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n}: not a BEIR record with an _id ({type(e).__name__})") from None
            if entry.image:
                entry.image = os.path.join(folder, entry.image)
                if not os.path.isfile(entry.image):
                    raise UserError(f"{path}:{n}: image {row['image']} not found under {folder}")
            if not entry.text and not entry.image:
                raise UserError(f"{path}:{n}: record {entry.id} has neither text nor image")
            out.append(entry)
    if not out:
        raise UserError(f"{path}: no records")
    return out


def read_beir(folder: str, split: str = "test") -> BeirData:
    corpus = _read_jsonl(os.path.join(folder, "corpus.jsonl"), folder)
    queries = _read_jsonl(os.path.join(folder, "queries.jsonl"), folder)
    path = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    qrels: Dict[str, Dict[str, float]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    for n, row in enumerate(rows[1:], 2):
        if len(row) < 3:
            raise UserError(f"{path}:{n}: expected query-id, corpus-id, score")
        try:
            qrels.setdefault(row[0], {})[row[1]] = float(row[2])
        except ValueError:
            raise UserError(f"{path}:{n}: score {row[2]!r} is not a number") from None
    docs = {e.id for e in corpus}
    unknown = sorted({d for judged in qrels.values() for d in judged} - docs)
    if unknown:
        raise UserError(f"{path}: judges corpus ids that corpus.jsonl lacks, e.g. {unknown[:3]}")
    return BeirData(corpus, queries, qrels)
