"""`moca data prepare`: interleaved JSONL / parquet (+ image files) -> webdataset shards + manifest.

Streaming and multi-process: records are read lazily in windows, validated and measured by a worker
pool (parse, image integrity via a reduced-size decode, pixel limit against decompression bombs,
token counts), and written in input order by the main process, so memory does not grow with the
corpus and the output is deterministic. Every skipped record is counted by reason in the manifest
and listed (key, input, reason) in skipped.jsonl; nothing else is lost.

At scale:
  * resumable: after each completed shard, prepare_state.json records how far the inputs were read;
    rerunning the same command after a kill keeps the completed shards, redoes the rest, and writes
    byte for byte what an uninterrupted run writes (the manifest carries no timestamp);
  * partitions: `--partition I/N` prepares every N-th input file from the I-th (a SLURM array job,
    examples/prepare_array.sbatch) into OUTPUT/part-0000I-of-0000N; `moca data merge OUTPUT` writes one
    manifest over all partitions' shards; sample keys carry a hash of their input file's path, so no
    two inputs (in one run or across partitions) share a key;
  * progress on stderr: documents/s, MB/s written, skipped (a line every 30 s when not a terminal).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

from megatron_moca.data.documents import Document, DocumentError, ImageFiles, from_record
from megatron_moca.data.image_processing import (ImageError, ImageProcessingConfig, ImageTooLarge, image_tokens,
                                                  open_image)
from megatron_moca.data.shards import FORMAT, MANIFEST, SKIPPED, ShardInfo, ShardWriter, read_manifest, safe_key
from megatron_moca.errors import UserError

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
BOMB = "image exceeds the decode pixel limit (decompression bomb?)"
WINDOW = 256  # records in flight per window: bounds memory whatever the corpus size


def list_inputs(src: str) -> List[str]:
    """The input tables: `src` itself, or every .jsonl / .json / .parquet under it; one that is not a regular
    file (a FIFO would block the reader forever) is refused in one line, before anything is opened."""
    from megatron_moca.data.files import file_problem

    if os.path.isdir(src):
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(src) for name in names
                       if name.endswith(INPUT_SUFFIXES))
        if not found:
            raise UserError(f"--input {src}: no {', '.join(INPUT_SUFFIXES)} files inside")
    else:
        found = [src]
    for path in found:
        problem = file_problem(path, 0)
        if problem:
            where = f"--input {src}" + (f": {os.path.relpath(path, src)}" if path != src else "")
            raise UserError(f"{where}: {'no such file or directory' if problem == 'missing' else problem}; "
                            "inputs must be regular files")
    return found


def key_prefix(name: str) -> str:
    """The sample-key prefix of an input file: its path (relative to the input root) made key-safe and
    cut to 48 characters, plus 10 hex digits of the exact path's sha256, so that inputs whose names
    differ only in characters safe_key replaces (or past the cut) never share keys."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{safe_key(os.path.splitext(name)[0])[:48]}-{digest}"


def iter_records(path: str, name: str) -> Iterator[Tuple[str, object]]:
    """(key, record or DocumentError) for every row of one input file, lazily; keys are
    key_prefix(name) (name: the file's path relative to the input root) and the row number."""
    from megatron_moca.data.files import file_problem

    problem = file_problem(path, 0)
    if problem:  # a FIFO would block the reader forever
        raise UserError(f"{path}: {'no such file' if problem == 'missing' else problem}; tables must be regular files")
    stem = key_prefix(name)
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
    key, record, files, source = item
    try:
        if isinstance(record, DocumentError):
            raise record
        doc = record if isinstance(record, Document) else from_record(record, key, files, source)
        text = sum(len(_TOKENIZER.encode(s)) for s in doc.segments if isinstance(s, str))
        images = sum(_checked_image_tokens(data) for data in doc.images)
        return key, doc, text, images
    except DocumentError as e:
        return key, str(e), 0, 0
    except Exception as e:  # one record never stops a prepare: counted under its error type
        return key, f"unexpected error ({type(e).__name__})", 0, 0


# -- main side ----------------------------------------------------------------------------------
STATE = "prepare_state.json"
PROGRESS_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


def parse_partition(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """'I/N' -> (I, N) with 0 <= I < N; None for None."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--partition {text}: expected I/N, e.g. 3/8") from None
    if not 0 <= index < count:
        raise UserError(f"--partition {text}: I must be within 0..N-1")
    return index, count


def partition_folder(output: str, partition: Tuple[int, int]) -> str:
    return os.path.join(output, f"part-{partition[0]:05d}-of-{partition[1]:05d}")


def prepare(src: str, output: str, workers: int = 0, max_shard_bytes: int = 256 * 2**20,
            tokenizer_dir: Optional[str] = None, progress: Optional[bool] = None,
            partition: Optional[Tuple[int, int]] = None, allow_images_outside_root: bool = False) -> dict:
    """Convert interleaved JSONL/parquet files (a file or a folder of them) into shards + manifest;
    with partition=(I, N), every N-th input file from the I-th into partition_folder(output). Image paths
    are read relative to their input file and confined to the input folder (real paths) unless
    allow_images_outside_root."""
    from megatron_moca.ownership import claim

    root = os.path.abspath(src) if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    real_output = os.path.realpath(output)
    if os.path.isdir(src) and os.path.commonpath([os.path.realpath(root), real_output]) == os.path.realpath(root):
        raise UserError(f"--output {output} is inside --input {src}: prepare would read its own files as input; "
                        "choose an output folder outside the input folder")
    all_inputs = list_inputs(src)
    all_names = [os.path.relpath(os.path.abspath(p), root) for p in all_inputs]
    inputs = all_inputs
    if partition is not None:
        inputs = all_inputs[partition[0]::partition[1]]
        if not inputs:
            raise UserError(f"--partition {partition[0]}/{partition[1]}: no input file falls in it "
                            f"(fewer input files than partitions)")
        claim(output, "moca data prepare")  # the folder of the partitions (moca data merge writes there)
        output = partition_folder(output, partition)
    names = [os.path.relpath(os.path.abspath(p), root) for p in inputs]
    settings = {"max_shard_bytes": max_shard_bytes, "tokenizer": tokenizer_dir, "format": FORMAT,
                "allow_images_outside_root": allow_images_outside_root}
    fingerprint = {"inputs": [[name, os.path.getsize(p), os.stat(p).st_mtime_ns] for name, p in zip(names, inputs)],
                   **settings}
    # what `moca data merge` checks: every partition cut from the same list of input files (where, names, sizes,
    # modification times) with the same settings
    listing = json.dumps([os.path.realpath(root)] + [[name, os.path.getsize(p), os.stat(p).st_mtime_ns]
                                                    for name, p in zip(all_names, all_inputs)])
    provenance = {"inputs_sha256": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest(),
                  "input_files": len(all_inputs), "partition": list(partition) if partition else None,
                  "settings": settings}

    def items():
        for path, name in zip(inputs, names):
            files = ImageFiles(os.path.dirname(os.path.abspath(path)), root, allow_images_outside_root)
            for key, record in iter_records(path, name):
                yield key, record, files, name

    return write_corpus(items(), output, names, workers, max_shard_bytes, tokenizer_dir, progress, fingerprint,
                        provenance)


class _Progress:
    """Documents/s, MB/s written and skipped counts on stderr: in place on a terminal, else a line
    every PROGRESS_EVERY seconds."""

    def __init__(self, enabled: Optional[bool]):
        self.tty = sys.stderr.isatty()
        self.enabled = True if enabled is None else enabled
        self.t0 = self.last = time.time()

    def show(self, documents: int, skipped: int, written_bytes: int, final: bool = False) -> None:
        now = time.time()
        if not self.enabled or not (final or self.tty or now - self.last >= PROGRESS_EVERY):
            return
        self.last = now
        seconds = max(now - self.t0, 1e-9)
        line = (f"prepare: {documents} documents ({documents / seconds:.1f}/s), {written_bytes / 2**20:.1f} MB written "
                f"({written_bytes / 2**20 / seconds:.1f} MB/s), {skipped} skipped, {seconds:.0f} s")
        print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def write_corpus(items: Iterator[tuple], output: str, inputs: List[str], workers: int = 0,
                 max_shard_bytes: int = 256 * 2**20, tokenizer_dir: Optional[str] = None,
                 progress: Optional[bool] = None, fingerprint: Optional[dict] = None,
                 provenance: Optional[dict] = None) -> dict:
    """Validate, measure and shard (key, record | Document | DocumentError, ImageFiles, input name) items
    into `output` (new, empty, or this command's earlier output: ownership.claim). A folder holding
    prepare_state.json of the same job (fingerprint) is resumed after its last complete shard; a folder
    holding the same job's manifest is returned as it is. provenance goes into the manifest as it is."""
    from megatron_moca.ownership import claim
    from megatron_moca.run_lock import exclusive

    fingerprint = fingerprint or {"inputs": inputs, "max_shard_bytes": max_shard_bytes, "tokenizer": tokenizer_dir,
                                  "format": FORMAT}
    claim(output, "moca data prepare", legacy=lambda folder: os.path.isfile(os.path.join(folder, STATE)))
    with exclusive(output, "moca data prepare"):
        return _write_corpus(items, output, inputs, workers, max_shard_bytes, tokenizer_dir, progress, fingerprint,
                             provenance)


def _write_corpus(items, output, inputs, workers, max_shard_bytes, tokenizer_dir, progress, fingerprint,
                  provenance) -> dict:
    state = _resumable_state(output, fingerprint)
    if state is not None and state.get("complete"):
        with open(os.path.join(output, MANIFEST)) as f:
            return json.load(f)
    workers = workers or max(1, (os.cpu_count() or 1))
    done = state or {"items": 0, "skipped": {}, "skipped_log_bytes": 0, "shards": [],
                     "totals": {"samples": 0, "text_tokens": 0, "image_tokens": 0, "images": 0}}
    skipped, totals = dict(done["skipped"]), dict(done["totals"])
    position = done["items"] - 1  # index of the last item accounted for
    shown = _Progress(progress)
    os.makedirs(output, exist_ok=True)
    skipped_log = open(os.path.join(output, SKIPPED), "r+" if state else "w")
    skipped_log.truncate(done["skipped_log_bytes"])
    skipped_log.seek(done["skipped_log_bytes"])

    def checkpoint(_shard: ShardInfo) -> None:  # a shard is complete: record how to resume after it
        skipped_log.flush()
        _write_json(os.path.join(output, STATE), {
            "fingerprint": fingerprint, "items": position + 1, "skipped": skipped, "totals": totals,
            "skipped_log_bytes": skipped_log.tell(), "shards": [vars(s) for s in writer.shards]})

    writer = ShardWriter(output, max_shard_bytes, done=[ShardInfo(**s) for s in done["shards"]], on_close=checkpoint)
    if not state:
        _write_json(os.path.join(output, STATE), {"fingerprint": fingerprint, **done})
    for _ in zip(range(done["items"]), items):  # what the completed shards already hold (or skipped)
        pass
    with skipped_log, mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) as pool:
        while True:
            window = [x for _, x in zip(range(WINDOW), items)]
            if not window:
                break
            for (key, result, text, image), item in zip(pool.map(_check, window, chunksize=8), window):
                position += 1
                if isinstance(result, Document):
                    totals["samples"] += 1
                    totals["text_tokens"] += text
                    totals["image_tokens"] += image
                    totals["images"] += len(result.images)
                    writer.write(result, text, image)
                else:
                    skipped[result] = skipped.get(result, 0) + 1
                    skipped_log.write(json.dumps({"key": key, "input": item[3], "reason": result}) + "\n")
            shown.show(totals["samples"], sum(skipped.values()), sum(s.bytes for s in writer.shards))
        shards = writer.close()
    shown.show(totals["samples"], sum(skipped.values()), sum(s.bytes for s in shards), final=True)
    manifest = {"format": FORMAT, "inputs": inputs, "totals": totals, "skipped": dict(sorted(skipped.items())),
                "shards": [vars(s) for s in shards], **({"provenance": provenance} if provenance else {})}
    _write_json(os.path.join(output, MANIFEST), manifest)
    _write_json(os.path.join(output, STATE), {"fingerprint": fingerprint, "complete": True})
    return manifest


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _written_here(name: str) -> bool:
    """Whether a name in a prepare output is one prepare writes (shards, their index and staging files, the
    manifest, skip log and state, temporary files): only those are ever removed."""
    return name.startswith("shard-") or name in (MANIFEST, SKIPPED, STATE) or name.endswith(".tmp")


def _resumable_state(output: str, fingerprint: dict) -> Optional[dict]:
    """The saved progress of this same job in `output` (a claimed folder; None when it holds none), with every
    file of ours that the last complete shard does not account for removed; a UserError for the output of
    another job (other inputs or settings)."""
    path = os.path.join(output, STATE)
    state = None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                state = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
    if state is not None and state.get("fingerprint") != fingerprint:
        saved = state.get("fingerprint") or {}
        differ = next((k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)), "?")
        raise UserError(f"--output {output}: holds the output of another prepare ({differ} differs: other inputs or "
                        "settings); choose a new directory, or rerun that prepare's own command")
    if state is not None and state.get("complete"):
        return state
    keep = {STATE, SKIPPED} | ({n for s in state["shards"] for n in (s["name"], s["name"] + ".idx")} if state else set())
    for name in os.listdir(output):
        if name not in keep and _written_here(name):  # a shard cut by the kill, later shards, temporary files
            os.remove(os.path.join(output, name))
    return state


def merge(output: str) -> dict:
    """One manifest.json in `output` over the shards of its complete partitions (part-*-of-N folders
    written by prepare(..., partition=(I, N)) for every I), with their totals and skip counts summed."""
    parts = sorted(n for n in os.listdir(output) if n.startswith("part-") and os.path.isdir(os.path.join(output, n))) \
        if os.path.isdir(output) else []
    if not parts:
        raise UserError(f"{output}: no part-*-of-* folders (write them with moca data prepare --partition I/N)")
    counts = {n.rsplit("-of-", 1)[-1] for n in parts}
    if len(counts) != 1:
        raise UserError(f"{output}: partitions of different counts ({', '.join(sorted(counts))}); merge one job's")
    count = int(counts.pop())
    expected = [f"part-{i:05d}-of-{count:05d}" for i in range(count)]
    missing = [n for n in expected if n not in parts or not os.path.isfile(os.path.join(output, n, MANIFEST))]
    if missing:
        raise UserError(f"{output}: partition {missing[0]} is missing or incomplete ({len(missing)} of {len(expected)}); "
                        "rerun its prepare command")
    from megatron_moca.ownership import claim
    from megatron_moca.run_lock import exclusive

    claim(output, "moca data prepare", "moca data merge", legacy=lambda folder: True)  # it holds our partitions
    with exclusive(output, "moca data merge"):
        return _merge(output, expected, count)


def _merge(output: str, expected: List[str], count: int) -> dict:
    merged = {"format": FORMAT, "inputs": [], "totals": {}, "skipped": {}, "shards": [], "partitions": expected}
    first = None
    for index, name in enumerate(expected):
        folder = os.path.join(output, name)
        read_manifest(folder, "moca data merge")  # every shard present with its recorded size
        with open(os.path.join(folder, MANIFEST)) as f:
            part = json.load(f)
        first = _same_job(output, name, part.get("provenance"), first, [index, count])
        merged["inputs"] += part["inputs"]
        for key, n in part["totals"].items():
            merged["totals"][key] = merged["totals"].get(key, 0) + n
        for reason, n in part["skipped"].items():
            merged["skipped"][reason] = merged["skipped"].get(reason, 0) + n
        merged["shards"] += [{**s, "name": f"{name}/{s['name']}"} for s in part["shards"]]
    merged["skipped"] = dict(sorted(merged["skipped"].items()))
    merged["provenance"] = {**first, "partition": None}
    _write_json(os.path.join(output, MANIFEST), merged)
    return merged


def _same_job(output: str, name: str, provenance: Optional[dict], first: Optional[dict], partition: list) -> dict:
    """A partition's recorded provenance, checked against the folder it is in and the first partition's
    (the same list of input files, the same settings); a UserError naming what differs."""
    if not isinstance(provenance, dict) or provenance.get("partition") != partition:
        raise UserError(f"{output}/{name}: its manifest does not record it as partition {partition[0]}/{partition[1]} "
                        "(written by an earlier release, or moved here); rerun its prepare command")
    if first is not None:
        for key, what in (("inputs_sha256", "from other input files"), ("input_files", "from other input files"),
                          ("settings", "with other settings")):
            if provenance.get(key) != first.get(key):
                raise UserError(f"{output}: {name} was prepared {what} than part-00000 ({key} differs); merge only "
                                "the partitions of one prepare job")
    return provenance
