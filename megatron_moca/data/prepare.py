"""`moca data prepare`: interleaved JSONL / parquet (+ image files) -> webdataset shards + manifest.

Streaming and multi-process: records are read lazily in windows, validated and measured by a worker
pool (parse, image integrity via a reduced-size decode, pixel limit against decompression bombs,
token counts), and written in input order by the main process, so memory does not grow with the
corpus and the output is deterministic. Every skipped record is counted by reason in the manifest
and listed (key, input, reason) in skipped.jsonl; nothing else is lost.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

from megatron_moca.data.documents import Document, DocumentError, from_record
from megatron_moca.data.image_processing import (ImageError, ImageProcessingConfig, ImageTooLarge, image_tokens,
                                                  open_image)
from megatron_moca.data.shards import FORMAT, MANIFEST, SKIPPED, ShardWriter, safe_key
from megatron_moca.errors import UserError

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
BOMB = "image exceeds the decode pixel limit (decompression bomb?)"
WINDOW = 256  # records in flight per window: bounds memory whatever the corpus size


def list_inputs(src: str) -> List[str]:
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise UserError(f"--input {src}: no such file or directory")
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(src) for name in names
                   if name.endswith(INPUT_SUFFIXES))
    if not found:
        raise UserError(f"--input {src}: no {', '.join(INPUT_SUFFIXES)} files inside")
    return found


def iter_records(path: str, name: str) -> Iterator[Tuple[str, object]]:
    """(key, record or DocumentError) for every row of one input file, lazily; keys derive from
    `name` (the file's path relative to the input root) and the row number."""
    stem = safe_key(os.path.splitext(name)[0])
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            for record in batch.to_pylist():
                yield f"{stem}-{row:09d}", record
                row += 1
        return
    with open(path, "rb") as f:
        for row, line in enumerate(f):
            key = f"{stem}-{row:09d}"
            if not line.strip():
                continue
            try:
                yield key, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield key, DocumentError("invalid UTF-8")
            except json.JSONDecodeError:
                yield key, DocumentError("invalid JSON")


# -- worker side --------------------------------------------------------------------------------
_TOKENIZER = None
_IMAGE_CFG = ImageProcessingConfig()


def _init_worker(tokenizer_dir: Optional[str]) -> None:
    global _TOKENIZER
    from megatron_moca.data.tokenizer import QwenTokenizer

    _TOKENIZER = QwenTokenizer(tokenizer_dir)


def _checked_image_tokens(data: bytes) -> int:
    """Decode at reduced size (catches corrupt/truncated files) and count the image's LLM tokens."""
    from PIL import Image

    try:
        img = open_image(data, _IMAGE_CFG)
        w, h = img.size
        if img.format == "JPEG":
            img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        img.load()
    except ImageTooLarge:
        raise DocumentError(BOMB) from None
    except ImageError as e:
        raise DocumentError(str(e)) from None
    except Image.DecompressionBombError:
        raise DocumentError(BOMB) from None
    except Exception as e:  # PIL raises many types for bad files
        raise DocumentError(f"undecodable image ({type(e).__name__})") from None
    try:
        return image_tokens(h, w, _IMAGE_CFG)
    except ValueError as e:
        raise DocumentError(str(e)) from None


def _check(item) -> Tuple[str, object, int, int]:
    """(key, Document or reason, text tokens, image tokens)."""
    key, record, base_dir, source = item
    try:
        if isinstance(record, DocumentError):
            raise record
        doc = record if isinstance(record, Document) else from_record(record, key, base_dir, source)
        text = sum(len(_TOKENIZER.encode(s)) for s in doc.segments if isinstance(s, str))
        images = sum(_checked_image_tokens(data) for data in doc.images)
        return key, doc, text, images
    except DocumentError as e:
        return key, str(e), 0, 0


# -- main side ----------------------------------------------------------------------------------
def prepare(src: str, output: str, workers: int = 0, max_shard_bytes: int = 256 * 2**20,
            tokenizer_dir: Optional[str] = None, progress: Optional[bool] = None) -> dict:
    """Convert interleaved JSONL/parquet files (a file or a folder of them) into shards + manifest."""
    inputs = list_inputs(src)
    root = os.path.abspath(src) if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))

    def items():
        for path in inputs:
            name = os.path.relpath(os.path.abspath(path), root)
            for key, record in iter_records(path, name):
                yield key, record, os.path.dirname(os.path.abspath(path)), name

    return write_corpus(items(), output, [os.path.relpath(os.path.abspath(p), root) for p in inputs], workers,
                        max_shard_bytes, tokenizer_dir, progress)


def write_corpus(items: Iterator[tuple], output: str, inputs: List[str], workers: int = 0,
                 max_shard_bytes: int = 256 * 2**20, tokenizer_dir: Optional[str] = None,
                 progress: Optional[bool] = None) -> dict:
    """Validate, measure and shard (key, record | Document | DocumentError, base dir, input name) items."""
    if os.path.exists(output) and os.listdir(output):
        raise UserError(f"--output {output}: exists and is not empty; choose a new directory")
    workers = workers or max(1, (os.cpu_count() or 1))
    progress = sys.stderr.isatty() if progress is None else progress
    writer = ShardWriter(output, max_shard_bytes)
    skipped, totals, t0 = {}, {"samples": 0, "text_tokens": 0, "image_tokens": 0, "images": 0}, time.time()
    with open(os.path.join(output, SKIPPED), "w") as skipped_log, \
            mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) as pool:
        while True:
            window = [x for _, x in zip(range(WINDOW), items)]
            if not window:
                break
            for (key, result, text, image), item in zip(pool.map(_check, window, chunksize=8), window):
                if isinstance(result, Document):
                    writer.write(result, text, image)
                    totals["samples"] += 1
                    totals["text_tokens"] += text
                    totals["image_tokens"] += image
                    totals["images"] += len(result.images)
                else:
                    skipped[result] = skipped.get(result, 0) + 1
                    skipped_log.write(json.dumps({"key": key, "input": item[3], "reason": result}) + "\n")
            if progress:
                print(f"\r{totals['samples']} written, {sum(skipped.values())} skipped, "
                      f"{time.time() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    shards = writer.close()
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "inputs": inputs, "totals": totals, "skipped": dict(sorted(skipped.items())),
                "shards": [vars(s) for s in shards]}
    tmp = os.path.join(output, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(output, MANIFEST))
    return manifest
