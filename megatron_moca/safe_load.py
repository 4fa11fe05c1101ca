"""Reading checkpoint files without running code from them: the one place that decides what a pickle
in a checkpoint may name.

A pickle can call any importable function while it is read, so a checkpoint from a stranger could run
code the moment it is loaded. Every file this project reads that holds a pickle goes through here:

  * torch files (stage-2 optimizer and RNG states, megatron's common.pt and its per-rank objects) are
    read with `torch.load(weights_only=True)`: tensors and plain Python values only;
  * the `.metadata` file of a torch_dist checkpoint (torch.distributed.checkpoint's index of what is
    where) is a plain pickle of a few dataclasses: it is read by `MetadataUnpickler`, which admits only
    CHECKPOINT_METADATA_CLASSES (what megatron-core 0.16.1 and 0.19.2 on torch 2.x actually write);
  * `audit_dist_checkpoint` reads all of those in a megatron checkpoint folder (`audit_torch_dcp` in a
    stage-2 FSDP checkpoint) BEFORE megatron-core or torch load it (both unpickle some of them without restrictions), so a folder that asks for anything
    else is refused with one line naming the file and the class, and nothing is loaded or written;
  * a module `_extra_state` that carries a payload (Transformer Engine pickles its FP8 metadata into one
    and unpickles it unrestricted on load) is refused unless MOCA_TRUST_FP8_EXTRA_STATE=1.

Everything else the project reads is JSON, YAML (safe_load), safetensors or images.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from typing import BinaryIO, Union

import torch

from megatron_moca.errors import UserError

# (module, name) pairs that a torch.distributed.checkpoint `.metadata` pickle may name. Read off the
# checkpoints that megatron-core 0.16.1 and 0.19.2 and torch 2.13's dcp.save write (tests/robustness/
# test_untrusted_checkpoints.py, tests/cpu/test_finetune_fsdp.py); torch dtypes are admitted by value (below).
CHECKPOINT_METADATA_CLASSES = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # torch's own FileSystemWriter records the folder (stage-2 FSDP checkpoints)
})


class UnsafeFileError(UserError):
    """A file asked for something other than tensors and plain data while being read."""


def _refusal(source: str, wanted: str) -> UnsafeFileError:
    return UnsafeFileError(f"{source}: refused to load: it asks for {wanted}, which is not checkpoint data "
                           "(loading never runs code from a file; see README, 'Robustness and trust')")


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only CHECKPOINT_METADATA_CLASSES and torch dtypes."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in CHECKPOINT_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refusal(self.source, f"{module}.{name}")

    def persistent_load(self, pid):
        raise _refusal(self.source, f"a persistent object {str(pid)[:60]!r}")


def read_checkpoint_metadata(path: str):
    """A torch.distributed.checkpoint `.metadata` file, read by the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f, path).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # truncated or garbled: pickle raises many kinds
        raise UserError(f"{path}: not a readable checkpoint metadata file ({type(e).__name__}: {e})") from None


_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global|GLOBAL) ([\w.]+)")


def load_weights_only(file: Union[str, BinaryIO], source: str = None):
    """torch.load with weights_only=True (tensors and plain Python values, never code) on the CPU.
    A payload that asks for anything else is an UnsafeFileError naming `source` and what it wanted."""
    source = source or str(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        raise _refusal(source, found.group(1) if found else "a non-data object") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{source}: missing") from None
        raise UserError(f"{source}: not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None


def load_json(path: str):
    """A JSON file's value; a UserError naming the file when it is not valid JSON (FileNotFoundError
    passes through: callers say what the file should have been)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def audit_dist_checkpoint(folder: str) -> None:
    """Read every pickle of a megatron torch_dist checkpoint folder restrictedly, before megatron or
    torch read it unrestricted: `.metadata` files, common.pt, and each non-tensor item (megatron's
    ShardedObjects: optimizer groups, loader positions, RNG states, extra states). Raises UserError
    (UnsafeFileError for a payload that names a non-data class) naming the file; returns nothing."""
    _check_backend(folder)
    audit_torch_dcp(folder)
    common = os.path.join(folder, "common.pt")
    if os.path.exists(common):
        load_weights_only(common)


def audit_torch_dcp(folder: str) -> None:
    """The torch.distributed.checkpoint part of the audit (also all of a stage-2 FSDP checkpoint): the
    `.metadata` files and every non-tensor item inside the .distcp files."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata_files = sorted(n for n in os.listdir(folder) if n.endswith(".metadata"))
    if ".metadata" not in metadata_files:
        raise UserError(f"{folder}: not a complete torch_dist checkpoint (no .metadata)")
    for name in metadata_files:
        metadata = read_checkpoint_metadata(os.path.join(folder, name))
        if name != ".metadata":
            continue
        byte_items = {key for key, meta in metadata.state_dict_metadata.items()
                      if isinstance(meta, BytesStorageMetadata)}
        for index, info in (metadata.storage_data or {}).items():
            if index.fqn in byte_items:
                _audit_byte_item(folder, index.fqn, info)


def _check_backend(folder: str) -> None:
    path = os.path.join(folder, "metadata.json")
    try:
        meta = load_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; not a megatron dist checkpoint") from None
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if backend != "torch_dist":
        raise UserError(f"{path}: sharded_backend {backend!r}; only torch_dist checkpoints are read")


def _audit_byte_item(folder: str, key: str, info) -> None:
    """One pickled item inside a .distcp file: bounds-checked against the file, read weights-only."""
    relative = str(getattr(info, "relative_path", ""))
    path = os.path.normpath(os.path.join(folder, relative))
    source = f"{path} (item {key})"
    if os.path.dirname(path) != os.path.normpath(folder):
        raise UserError(f"{folder}/.metadata: item {key} points outside the checkpoint folder ({relative!r})")
    if getattr(info, "transform_descriptors", None):
        raise UserError(f"{source}: stored with transforms {info.transform_descriptors}; not supported")
    offset, length = int(info.offset), int(info.length)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UserError(f"{source}: the data file is missing") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise UserError(f"{source}: bytes {offset}..{offset + length} lie outside the {size}-byte file")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    value = load_weights_only(io.BytesIO(data), source)
    if key.split("/")[0].endswith("._extra_state") and _holds_bytes(value) and os.environ.get(TRUST_EXTRA_STATE) != "1":
        raise UnsafeFileError(f"{source}: holds serialized module state (Transformer Engine's FP8 metadata), which "
                              f"TE unpickles without restriction when it loads; set {TRUST_EXTRA_STATE}=1 for "
                              "checkpoints you trust")


TRUST_EXTRA_STATE = "MOCA_TRUST_FP8_EXTRA_STATE"


def _holds_bytes(value) -> bool:
    """Whether a module's `_extra_state` carries a payload (TE: a pickle as a uint8 tensor or BytesIO);
    megatron's own modules store None."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, io.BytesIO) and item.getbuffer().nbytes:
            return True
        if isinstance(item, torch.Tensor) and item.numel():
            return True
    return False
