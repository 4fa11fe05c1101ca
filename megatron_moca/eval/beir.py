"""BEIR-format retrieval data, as ViDoRe-v2 and most text benchmarks ship it:

    corpus.jsonl | corpus.parquet     {"_id" | "corpus-id", "text" (optional), "image" (optional)}
    queries.jsonl | queries.parquet   {"_id" | "query-id", "text" | "query", "image" (optional)}
    qrels/<split>.tsv (query-id, corpus-id, score; a header line) | qrels.jsonl | qrels.parquet

An image is a path relative to the folder, raw bytes, or a {"bytes": ..., "path": ...} struct (parquet).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from megatron_moca.data.documents import LONE_SURROGATE, valid_unicode
from megatron_moca.errors import UserError


@dataclass
class Entry:
    id: str
    text: str
    image: Union[str, bytes, None] = None  # absolute path or encoded bytes


@dataclass
class BeirData:
    corpus: List[Entry]
    queries: List[Entry]
    qrels: Dict[str, Dict[str, float]]


def _table(folder: str, name: str) -> Optional[str]:
    for suffix in (".jsonl", ".parquet"):
        if os.path.isfile(os.path.join(folder, name + suffix)):
            return os.path.join(folder, name + suffix)
    return None


def table_rows(path: str):
    """(line or row number, record) of a .jsonl or .parquet table."""
    from megatron_moca.data.documents import DocumentError
    from megatron_moca.data.prepare import iter_records

    for n, (_, record) in enumerate(iter_records(path, os.path.basename(path)), 1):
        if isinstance(record, DocumentError):
            raise UserError(f"{path}:{n}: {record}")
        yield n, record


def _image(value, folder: str, where: str):
    if isinstance(value, dict):  # parquet image struct
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        from megatron_moca.data.files import checked_image_path

        return checked_image_path(folder, value, where)
    return None


def _read_entries(folder: str, name: str, id_key: str) -> List[Entry]:
    path = _table(folder, name)
    if path is None:
        raise UserError(f"{os.path.join(folder, name)}.jsonl does not exist (BEIR layout: corpus, queries and "
                        "qrels as .jsonl or .parquet)")
    out, first_seen = [], {}
    for n, row in table_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or ("_id" not in row and id_key not in row):
            raise UserError(f"{where}: not a BEIR record with an _id (or {id_key})")
        image = _image(row.get("image"), folder, where)
        entry = Entry(str(row.get("_id", row.get(id_key))), str(row.get("text") or row.get("query") or ""), image)
        if not entry.text and entry.image is None:
            raise UserError(f"{where}: record {entry.id} has neither text nor image")
        if not valid_unicode(entry.text):
            raise UserError(f"{where}: record {entry.id!r}: {LONE_SURROGATE}")
        if entry.id in first_seen:
            raise UserError(f"{where}: id {entry.id!r} again (first at line {first_seen[entry.id]}); ids must be unique")
        first_seen[entry.id] = n
        out.append(entry)
    if not out:
        raise UserError(f"{path}: no records")
    return out


def _read_qrels(folder: str, split: str) -> Dict[str, Dict[str, float]]:
    tsv = os.path.join(folder, "qrels", f"{split}.tsv")
    table = _table(folder, "qrels")
    qrels: Dict[str, Dict[str, float]] = {}
    if os.path.isfile(tsv):
        with open(tsv, newline="") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f, delimiter="\t"), 1)][1:]
        source = tsv
    elif table is not None:
        rows = [(n, [r.get("query-id"), r.get("corpus-id"), r.get("score")]) for n, r in table_rows(table)]
        source = table
    else:
        raise UserError(f"{tsv} does not exist (nor qrels.jsonl / qrels.parquet)")
    for n, row in rows:
        if len(row) < 3 or row[0] is None or row[1] is None:
            raise UserError(f"{source}:{n}: expected query-id, corpus-id, score")
        try:
            grade = float(row[2])
        except (TypeError, ValueError):
            raise UserError(f"{source}:{n}: score {row[2]!r} is not a number") from None
        if not math.isfinite(grade):
            raise UserError(f"{source}:{n}: score {row[2]!r} is not a finite number (qrels grade relevance: 0, 1, 2, ...)")
        qrels.setdefault(str(row[0]), {})[str(row[1])] = grade
    return qrels


def beir_sets(folder: str) -> List[str]:
    """[folder] if it is a BEIR set (has a corpus table), else its subfolders that are (a collection, e.g.
    the ViDoRe-v2 sets side by side), sorted; [] if neither."""
    if _table(folder, "corpus") is not None:
        return [folder]
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if os.path.isdir(os.path.join(folder, name)) and _table(os.path.join(folder, name), "corpus") is not None]


def read_beir(folder: str, split: str = "test") -> BeirData:
    corpus = _read_entries(folder, "corpus", "corpus-id")
    queries = _read_entries(folder, "queries", "query-id")
    qrels = _read_qrels(folder, split)
    docs = {e.id for e in corpus}
    unknown = sorted({d for judged in qrels.values() for d in judged} - docs)
    if unknown:
        raise UserError(f"the qrels of {folder} judge corpus ids that the corpus lacks, e.g. {unknown[:3]}")
    asked = {q.id for q in queries}
    strangers = sorted(set(qrels) - asked)
    if strangers:
        raise UserError(f"the qrels of {folder} judge query ids that the queries lack, e.g. {strangers[:3]}")
    if not any(grade > 0 for judged in qrels.values() for grade in judged.values()):
        raise UserError(f"the {split} qrels of {folder} judge no query relevant to any document: nothing to score")
    return BeirData(corpus, queries, qrels)


def write_jsonl(path: str, rows) -> None:
    """One JSON object per line (the tables the builders here write)."""
    import json

    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_beir(folder: str, corpus: List[dict], queries: List[dict], qrels: List[str]) -> None:
    """corpus.jsonl, queries.jsonl and qrels/test.tsv (lines "query-id<TAB>corpus-id<TAB>score") in `folder`,
    the layout read_beir reads (the stand-in and evaluation-set builders write it)."""
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    write_jsonl(os.path.join(folder, "corpus.jsonl"), corpus)
    write_jsonl(os.path.join(folder, "queries.jsonl"), queries)
    with open(os.path.join(folder, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
