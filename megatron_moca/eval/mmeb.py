"""MMEB evaluation (`moca eval --task mmeb`): the TIGER-Lab/MMEB-eval layout, hit@1 per subset.

    DATA/<Subset>/*.parquet | *.jsonl   rows {qry_text, qry_img_path, tgt_text: [...], tgt_img_path: [...]}
    DATA/eval_images/...                the images the *_img_path columns name (else relative to DATA)

Each row ranks its own candidates (~1000; the positive is candidate 0) by cosine similarity with the
query: hit@1 = the positive ranks first. Every distinct (text, image) input is embedded once. The
Phi-3-V placeholder `<|image_1|>` in the texts becomes Qwen's vision placeholder, and is removed where the
row has no image (spec moca-method.md, "Prompts" and "Evaluation protocols"). Scores are plain means:
overall over the subsets evaluated, and as MMEB reports them, the means of its four meta-tasks and of its
in-distribution (the 20 MMEB-train sets) and out-of-distribution (16) sets, over the subsets present.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_moca.data.documents import LONE_SURROGATE, valid_unicode
from megatron_moca.data.files import checked_image_path
from megatron_moca.embed.inputs import PHI3V_IMAGE, embedder_input
from megatron_moca.errors import UserError


# MMEB's 36 evaluation sets by meta-task, and which are in-distribution (MMEB-train has them) - the
# grouping of MMEB's results table (Jiang et al., 2024, VLM2Vec, Table 1)
META_TASKS = {
    "classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "vqa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                  "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
IN_DISTRIBUTION = frozenset({
    "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA",
    "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
    "WebQA", "MSCOCO"})


def grouped_means(hits: Dict[str, float]) -> Dict[str, object]:
    """MMEB's meta-task and IND / OOD means over the subsets in `hits` that MMEB has (empty if none)."""
    def mean(names):
        values = [hits[n] for n in names if n in hits]
        return sum(values) / len(values) if values else None

    known = {n for names in META_TASKS.values() for n in names}
    out: Dict[str, object] = {}
    meta = {task: mean(names) for task, names in META_TASKS.items()}
    if any(v is not None for v in meta.values()):
        out["meta_tasks"] = {k: v for k, v in meta.items() if v is not None}
    for key, names in (("in_distribution", known & IN_DISTRIBUTION), ("out_of_distribution", known - IN_DISTRIBUTION)):
        value = mean(names)
        if value is not None:
            out[key] = value
    return out


@dataclass
class MmebSubset:
    """One subset read and checked: each row's query and candidate input indices into `inputs`."""

    name: str
    rows: List[Tuple[int, List[int]]]
    inputs: List[object]


def _image_path(image, root: str, where: str) -> Optional[str]:
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise UserError(f"{where}: image paths must be strings, got {type(image).__name__}")
    return checked_image_path(root, image, where, "MMEB image")


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


def _checked_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: an MMEB row is an object")
    for key in ("qry_text", "tgt_text", "tgt_img_path"):
        if key not in row:
            raise UserError(f"{where}: MMEB row without {key}")
    texts, images = row["tgt_text"], row["tgt_img_path"]
    if not isinstance(texts, list) or not isinstance(images, list) or not texts or len(texts) != len(images):
        raise UserError(f"{where}: tgt_text and tgt_img_path must be non-empty lists of equal length")
    if not all(isinstance(t, str) or t is None for t in [row["qry_text"], *texts]):
        raise UserError(f"{where}: qry_text and tgt_text entries must be strings")
    if not all(valid_unicode(t) for t in [row["qry_text"], *texts] if t is not None):
        raise UserError(f"{where}: {LONE_SURROGATE}")
    return row


def read_subset(name: str, files: List[str], root: str, limit: int = 0) -> MmebSubset:
    """Every row of one subset (the first `limit`), checked, its images confined to root and present;
    every distinct (text, image) input listed once."""
    from megatron_moca.eval.beir import table_rows

    index: Dict[Tuple[str, str], int] = {}
    inputs: List[object] = []

    def key_of(text, image, where):
        key = (text or "", image or "")
        if key not in index:
            index[key] = len(inputs)
            inputs.append(embedder_input(text or "", _image_path(image, root, where), PHI3V_IMAGE))
        return index[key]

    rows = []
    for path in files:
        for n, row in table_rows(path):
            where = f"{path}:{n}"
            row = _checked_row(row, where)
            query = key_of(row["qry_text"], row.get("qry_img_path"), where)
            rows.append((query, [key_of(t, i, where) for t, i in zip(row["tgt_text"], row["tgt_img_path"])]))
            if limit and len(rows) >= limit:
                return MmebSubset(name, rows, inputs)
    if not rows:
        raise UserError(f"MMEB subset {name}: its tables ({', '.join(os.path.basename(f) for f in files)}) have no rows")
    return MmebSubset(name, rows, inputs)


def read_mmeb(folder: str, limit: int = 0) -> List[MmebSubset]:
    """Every subset of an MMEB-eval folder, read and checked before any model is loaded."""
    root = os.path.join(folder, "eval_images") if os.path.isdir(os.path.join(folder, "eval_images")) else folder
    return [read_subset(name, files, root, limit) for name, files in subsets(folder)]


def evaluate_subset(embedder, subset: MmebSubset, batch_size: int = 8) -> Dict[str, float]:
    vectors = embedder.embed(subset.inputs, batch_size=batch_size, progress=subset.name)
    hits = 0
    for query, candidates in subset.rows:
        scores = vectors[candidates] @ vectors[query]
        hits += int(torch.argmax(scores).item() == 0)
    return {"hit@1": hits / len(subset.rows), "rows": len(subset.rows), "inputs": len(subset.inputs)}


def evaluate_mmeb(embedder, data: List[MmebSubset], batch_size: int = 8, log=None) -> Dict[str, object]:
    results = {}
    for subset in data:
        results[subset.name] = evaluate_subset(embedder, subset, batch_size)
        if log:
            log(f"{subset.name}: hit@1 {results[subset.name]['hit@1']:.4f} over {results[subset.name]['rows']} rows")
    overall = sum(r["hit@1"] for r in results.values()) / len(results)
    hits = {name: r["hit@1"] for name, r in results.items()}
    return {"overall": overall, **grouped_means(hits), "subsets": hits, "prompts": MMEB_PROMPTS}


MMEB_PROMPTS = {"query": "each row's qry_text as MMEB gives it (its instruction included)",
                "candidates": "each row's tgt_text as given", "image": "<|image_1|> marks where the image goes"}
"""What the MMEB harness embeds (recorded with its scores): the rows' own texts, no prompt of ours."""
