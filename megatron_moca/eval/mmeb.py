"""MMEB evaluation (`moca eval --task mmeb`): the TIGER-Lab/MMEB-eval layout, hit@1 per subset.

    DATA/<Subset>/*.parquet | *.jsonl   rows {qry_text, qry_img_path, tgt_text: [...], tgt_img_path: [...]}
    DATA/eval_images/...                the images the *_img_path columns name (else relative to DATA)

Each row ranks its own candidates (~1000; the positive is candidate 0) by cosine similarity with the
query: hit@1 = the positive ranks first. Every distinct (text, image) input is embedded once. The
Phi-3-V placeholder `<|image_1|>` in the texts becomes Qwen's vision placeholder, and is removed where the
row has no image (spec moca-method.md, "Prompts" and "Evaluation protocols"). Scores are plain means.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Tuple

import torch

from megatron_moca.errors import UserError
from megatron_moca.embed.inputs import PHI3V_IMAGE, embedder_input

def _item(text: str, image: Optional[str], root: str):
    path = os.path.join(root, image) if image else None
    if path is not None and not os.path.isfile(path):
        raise UserError(f"MMEB image {image} not found under {root}")
    return embedder_input(text or "", path, PHI3V_IMAGE)


def subsets(folder: str) -> List[Tuple[str, List[str]]]:
    """(name, table files) of every subset folder, sorted by name."""
    found = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        files = sorted(glob.glob(os.path.join(folder, entry, "*.parquet")) +
                       glob.glob(os.path.join(folder, entry, "*.jsonl")))
        if files:
            found.append((entry, files))
    if not found:
        raise UserError(f"{folder}: no MMEB subset folders with .parquet or .jsonl tables (TIGER-Lab/MMEB-eval layout)")
    return found


def _rows(files: List[str]):
    from megatron_moca.eval.beir import table_rows

    for path in files:
        for n, row in table_rows(path):
            for key in ("qry_text", "tgt_text", "tgt_img_path"):
                if key not in row:
                    raise UserError(f"{path}:{n}: MMEB row without {key}")
            if len(row["tgt_text"]) != len(row["tgt_img_path"]) or not row["tgt_text"]:
                raise UserError(f"{path}:{n}: tgt_text and tgt_img_path must be non-empty lists of equal length")
            yield row


def evaluate_subset(embedder, files: List[str], root: str, batch_size: int = 8, limit: int = 0) -> Dict[str, float]:
    inputs: Dict[str, object] = {}
    index: Dict[str, int] = {}

    def key_of(text, image):
        key = repr((text or "", image or ""))
        if key not in index:
            index[key] = len(index)
            inputs[key] = _item(text, image, root)
        return index[key]

    rows = []
    for row in _rows(files):
        query = key_of(row["qry_text"], row.get("qry_img_path"))
        candidates = [key_of(t, i) for t, i in zip(row["tgt_text"], row["tgt_img_path"])]
        rows.append((query, candidates))
        if limit and len(rows) >= limit:
            break
    vectors = embedder.embed(list(inputs.values()), batch_size=batch_size)
    hits = 0
    for query, candidates in rows:
        scores = vectors[candidates] @ vectors[query]
        hits += int(torch.argmax(scores).item() == 0)
    return {"hit@1": hits / len(rows), "rows": len(rows), "inputs": len(inputs)}


def evaluate_mmeb(embedder, folder: str, batch_size: int = 8, limit: int = 0, log=None) -> Dict[str, object]:
    root = os.path.join(folder, "eval_images") if os.path.isdir(os.path.join(folder, "eval_images")) else folder
    results = {}
    for name, files in subsets(folder):
        results[name] = evaluate_subset(embedder, files, root, batch_size, limit)
        if log:
            log(f"{name}: hit@1 {results[name]['hit@1']:.4f} over {results[name]['rows']} rows")
    overall = sum(r["hit@1"] for r in results.values()) / len(results)
    return {"overall": overall, "subsets": {name: r["hit@1"] for name, r in results.items()}}
