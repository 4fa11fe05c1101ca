"""Reading and writing Hugging Face checkpoint folders (safetensors, sharded or not), lazily.

A reader opens each shard memory-mapped and hands out one tensor at a time, so a conversion holds
about one copy of the model. Every problem with the folder surfaces as a UserError naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, Iterator, List, Tuple

import torch

from megatron_moca.conversion.mapping import normalize_hf_key
from megatron_moca.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files a release folder carries besides the weights
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json", "processor_config.json", "video_preprocessor_config.json")


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a directory")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; a Hugging Face Qwen2.5-VL folder needs config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


class SafetensorsReader:
    """Tensor name (legacy on-disk layout) -> shard, for a folder with one file or an index."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index_path, single_path = os.path.join(folder, INDEX_NAME), os.path.join(folder, SINGLE_NAME)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise UserError(f"{index_path}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single_path):
            files = [SINGLE_NAME]
        else:
            raise UserError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}; only safetensors checkpoints are read")
        self._handles, self._where = {}, {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: listed in {INDEX_NAME} but missing")
            try:
                handle = safe_open(path, framework="pt")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in keys:
                self._where[normalize_hf_key(key)] = (name, key)

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UserError(f"{self.folder}: tensor {key!r} missing from the checkpoint")
        name, raw = self._where[key]
        try:
            return self._handles[name].get_tensor(raw)
        except Exception as e:
            raise UserError(f"{os.path.join(self.folder, name)}: tensor {raw!r} unreadable ({e})") from None


def write_sharded(tensors: Iterable[Tuple[str, torch.Tensor]], folder: str, max_shard_bytes: int = 5 * 2**30,
                  metadata: Dict[str, str] = None) -> List[str]:
    """Write (name, tensor) pairs as model-0000i-of-0000n.safetensors shards + index, streaming.

    Holds at most one shard in memory. Names are final only once every shard is written.
    """
    from safetensors.torch import save_file

    shards: List[Tuple[str, List[str]]] = []
    pending: Dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush():
        nonlocal pending, size
        if pending:
            tmp = f"shard-{len(shards):05d}.tmp"
            save_file(pending, os.path.join(folder, tmp), metadata={"format": "pt", **(metadata or {})})
            shards.append((tmp, list(pending)))
            pending, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = t.contiguous()
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


def copy_side_files(src: str, dst: str) -> List[str]:
    """Copy tokenizer / processor / generation files that exist in src."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def iter_sorted(d: Dict[str, torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor]]:
    for k in sorted(d):
        yield k, d[k]
