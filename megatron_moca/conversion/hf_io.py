"""Reading and writing Hugging Face checkpoint folders (safetensors, sharded or not), lazily.

Both directions move one tensor at a time with plain file I/O (no memory maps, no serialised shard
buffers), so a conversion holds about one copy of the model. Every problem with the folder surfaces as a UserError naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_moca.conversion.mapping import normalize_hf_key
from megatron_moca.errors import UserError
from megatron_moca.safe_load import load_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files a release folder carries besides the weights
SIDE_FILES = ("moca_embedding.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json", "processor_config.json", "video_preprocessor_config.json")


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a directory")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; a Hugging Face Qwen2.5-VL folder needs config.json")
    return load_json(path)


def load_transformers_model(folder: str, dtype: torch.dtype, device=None):
    """transformers' Qwen2_5_VLForConditionalGeneration from an HF folder (sdpa attention), reading
    safetensors only (a pickled pytorch_model.bin is never opened) and never code from the folder. device: a
    GPU to load the weights straight onto (no host copy of the model per rank: 8 ranks x 33 GB of fp32 7B
    weights would otherwise sit in one node's memory at start-up); None or the CPU: on the host."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    read_config(folder)  # a one-line error for a folder that is not an HF model
    placement = {"device_map": {"": torch.device(device)}} if device is not None and \
        torch.device(device).type == "cuda" else {}
    try:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False,
            **placement)
    except Exception as e:  # transformers raises many types for unloadable folders
        message = str(e).splitlines()[0][:300] if str(e) else ""
        raise UserError(f"{folder}: transformers cannot load it ({type(e).__name__}: {message})") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_header(path: str) -> Tuple[Dict[str, dict], int]:
    """(tensor entries, byte offset of the data section) of one safetensors file, validated against the
    file's size before anything is allocated from what the header claims."""
    size = os.path.getsize(path)

    def malformed(why: str) -> UserError:
        return UserError(f"{path}: not a readable safetensors file ({why})")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise malformed("shorter than its header")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, 100 * 2**20):
            raise malformed(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise malformed(f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise malformed("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
            raise malformed(f"tensor {key!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise malformed(f"tensor {key!r} has a bad shape {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise malformed(f"tensor {key!r} has bad data_offsets {str(offsets)[:60]}")
        start, end = offsets
        if not 0 <= start <= end <= data_bytes:
            raise malformed(f"tensor {key!r} is truncated or malformed")
        numel = 1
        for d in shape:
            numel *= d
        if numel * _ST_DTYPES[entry["dtype"]].itemsize != end - start:
            raise malformed(f"tensor {key!r} holds {end - start} bytes, its shape {shape} needs "
                            f"{numel * _ST_DTYPES[entry['dtype']].itemsize}")
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], key) for key, entry in header.items())
    for (_, end, before), (start, _, after) in zip(spans, spans[1:]):
        if start < end:  # the format stores each tensor once; shared bytes would alias two tensors
            raise malformed(f"tensors {before!r} and {after!r} overlap")
    return header, 8 + n


class SafetensorsReader:
    """Tensor name (legacy on-disk layout) -> shard, for a folder with one file or an index.

    Reads each tensor with plain file reads into fresh memory: no memory map stays resident, so a
    conversion holds the model plus one tensor in flight, not a second copy in mapped pages.
    """

    def __init__(self, folder: str):
        self.folder = folder
        index_path, single_path = os.path.join(folder, INDEX_NAME), os.path.join(folder, SINGLE_NAME)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise UserError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
            outside = [name for name in files if not isinstance(name, str) or os.path.basename(name) != name]
            if outside:
                raise UserError(f"{index_path}: names a file outside the folder ({str(outside[0])[:80]!r})")
        elif os.path.isfile(single_path):
            files = [SINGLE_NAME]
        else:
            raise UserError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}; only safetensors checkpoints are read")
        self._where = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: listed in {INDEX_NAME} but missing")
            header, data_start = _read_header(path)
            for key, entry in header.items():
                self._where[normalize_hf_key(key)] = (path, data_start, entry)

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UserError(f"{self.folder}: tensor {key!r} missing from the checkpoint")
        path, data_start, entry = self._where[key]
        start, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])  # size checked in _read_header
        if not out.numel():
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(path, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(buf) != end - start:
                raise UserError(f"{path}: tensor {key!r} is truncated")
        return out


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> int:
    """Write one safetensors file straight from the tensors' memory (no serialised copy of the shard).

    Returns the number of data bytes. Format: 8-byte little-endian header size, JSON header (padded
    to 8 bytes), then each tensor's raw little-endian bytes in header order.
    """
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, offset, ordered = {"__metadata__": dict(metadata or {"format": "pt"})}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        ordered.append(t)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in ordered:
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return offset


def write_sharded(tensors: Iterable[Tuple[str, torch.Tensor]], folder: str, max_shard_bytes: int = 5 * 2**30,
                  metadata: Dict[str, str] = None) -> List[str]:
    """Write (name, tensor) pairs as model-0000i-of-0000n.safetensors shards + index, streaming.

    Holds references to at most one shard's tensors; files get their final names only once every
    shard is written.
    """
    shards: List[Tuple[str, List[str]]] = []
    pending: Dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush():
        nonlocal pending, size
        if pending:
            tmp = f"shard-{len(shards):05d}.tmp"
            write_safetensors(os.path.join(folder, tmp), pending, {"format": "pt", **(metadata or {})})
            shards.append((tmp, list(pending)))
            pending, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    weight_map, files = {}, []
    for i, (tmp, names) in enumerate(shards):
        final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, tmp), os.path.join(folder, final))
        files.append(final)
        weight_map.update({k: final for k in names})
    if n > 1:
        with open(os.path.join(folder, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return files


EMBEDDING_FILE = "moca_embedding.json"


def write_embedding_settings(folder: str, min_pixels: int, max_pixels: int, max_length: int) -> None:
    """Record how the model was trained to embed, where clients look: moca_embedding.json (read by
    MocaEmbedder and `moca eval`) and the image bounds in preprocessor_config.json (transformers'
    Qwen2-VL processor: min/max_pixels and size), replacing a base model's bounds (images resized
    outside the trained range embed far worse)."""
    with open(os.path.join(folder, EMBEDDING_FILE), "w") as f:
        json.dump({"attention": "bidirectional", "pooling": "mean", "normalize": True, "max_length": max_length,
                   "min_pixels": min_pixels, "max_pixels": max_pixels}, f, indent=1)
    path = os.path.join(folder, "preprocessor_config.json")
    processor = load_json(path) if os.path.isfile(path) else {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "processor_class": "Qwen2_5_VLProcessor"}
    processor.update(min_pixels=min_pixels, max_pixels=max_pixels,
                     size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    with open(path, "w") as f:
        json.dump(processor, f, indent=1)
    write_sentence_transformers_files(folder)


# sentence-transformers prompts (prefixes; "<img>" marks where an input's image goes, else it goes first):
# MoCa embeds queries and text documents as given and document pages with this instruction (spec
# moca-method.md, "Prompts"; eval/retrieval.py uses the same)
ST_PROMPTS = {"query": "", "document": "", "image_document": "<img>\nRepresent the given document image."}
ST_MODULE = "moca_sentence_transformers"


def write_sentence_transformers_files(folder: str) -> None:
    """modules.json + config_sentence_transformers.json + the module's code (embed/moca_sentence_transformers.py,
    torch and transformers only), so that `SentenceTransformer(folder, trust_remote_code=True)` embeds as
    MocaEmbedder does."""
    import shutil

    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embed", ST_MODULE + ".py")
    shutil.copyfile(source, os.path.join(folder, ST_MODULE + ".py"))
    files = {"modules.json": [{"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULE}.MocaEmbedding"}],
             "config_sentence_transformers.json": {"prompts": ST_PROMPTS, "default_prompt_name": None,
                                                   "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=1)


def read_embedding_settings(folder: str) -> dict:
    """max_length / min_pixels / max_pixels a folder records: moca_embedding.json, else the image bounds
    of its preprocessor_config.json; {} where it says nothing."""
    path = os.path.join(folder, EMBEDDING_FILE)
    if os.path.isfile(path):
        given = load_json(path)
        return {k: given[k] for k in ("max_length", "min_pixels", "max_pixels") if isinstance(given.get(k), int)}
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    processor = load_json(path)
    size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
    bounds = {"min_pixels": processor.get("min_pixels", size.get("shortest_edge")),
              "max_pixels": processor.get("max_pixels", size.get("longest_edge"))}
    return {k: v for k, v in bounds.items() if isinstance(v, int)}


def copy_side_files(src: Optional[str], dst: str) -> List[str]:
    """Copy the tokenizer / processor / generation files that exist in src (None: none), then write the
    bundled Qwen2.5-VL tokenizer where src had no tokenizer.json, so that every HF folder we write loads
    in `transformers.AutoTokenizer` (an empty tokenizer otherwise comes back silently)."""
    copied = []
    for name in SIDE_FILES if src else ():
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    if "tokenizer.json" not in copied:
        from megatron_moca.data.tokenizer import write_hf_tokenizer

        copied += [name for name in write_hf_tokenizer(dst) if name not in copied]
    drop_unshipped_auto_map(dst)
    return copied


def _shipped(reference: str, folder: str) -> bool:
    """Whether an auto_map entry ("module.Class", "repo--module.Class") names code the folder holds."""
    module = reference.split("--")[-1].rsplit(".", 1)[0]
    return os.path.isfile(os.path.join(folder, module.replace(".", os.sep) + ".py"))


def drop_unshipped_auto_map(folder: str) -> None:
    """Remove auto_map entries of the folder's config / tokenizer / processor JSON that name code the folder
    does not ship (a base model's remote code): transformers would fetch or fail on them with
    trust_remote_code, and without it they only mislead."""
    for name in ("config.json",) + tuple(n for n in SIDE_FILES if n.endswith(".json")):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            values = json.load(f)
        auto_map = values.get("auto_map") if isinstance(values, dict) else None
        if not isinstance(auto_map, dict):
            continue
        kept = {key: ref for key, ref in auto_map.items()
                if all(isinstance(r, str) and _shipped(r, folder) for r in (ref if isinstance(ref, list) else [ref])
                       if r is not None)}
        if kept == auto_map:
            continue
        if kept:
            values["auto_map"] = kept
        else:
            del values["auto_map"]
        with open(path, "w") as f:
            json.dump(values, f, indent=2)
