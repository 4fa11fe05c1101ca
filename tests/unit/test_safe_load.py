"""The restricted unpickler of checkpoint metadata admits exactly its allowlist (and torch dtypes by value):
every other callable of the very modules it trusts is refused, naming the file and what was asked for."""

import io
import pickle

import pytest

from megatron_moca.safe_load import CHECKPOINT_METADATA_CLASSES, MetadataUnpickler, UnsafeFileError


def global_pickle(module, name):
    """A protocol-2 pickle that only looks a global up: GLOBAL 'module name', then STOP."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."


@pytest.mark.parametrize("module, name", sorted(CHECKPOINT_METADATA_CLASSES))
def test_every_allowed_name_resolves(module, name):
    assert MetadataUnpickler(io.BytesIO(global_pickle(module, name)), "f").load() is not None


@pytest.mark.parametrize("module, name", [
    ("posix", "system"), ("os", "system"), ("builtins", "eval"), ("builtins", "getattr"),
    # other callables of modules whose classes are allowed
    ("torch", "load"), ("torch", "save"), ("torch", "Tensor"), ("torch", "tensor"), ("torch", "_C"),
    ("torch.serialization", "load"), ("torch.serialization", "_load"), ("collections", "namedtuple"),
    ("collections", "defaultdict"), ("pathlib", "Path"), ("pathlib", "PurePosixPath"),
    ("torch.distributed.checkpoint.metadata", "Any"), ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
    ("torch.distributed.checkpoint.planner", "LoadPlan"),
    # a name of an allowed pair under another module, and the reverse
    ("collections", "Size"), ("torch", "OrderedDict"),
])
def test_every_other_name_is_refused_naming_it(module, name):
    with pytest.raises(UnsafeFileError) as err:
        MetadataUnpickler(io.BytesIO(global_pickle(module, name)), "ckpt/.metadata").load()
    assert str(err.value).startswith(f"ckpt/.metadata: refused to load: it asks for {module}.{name}, ")


def test_torch_dtypes_are_admitted_by_value_only():
    import torch

    assert MetadataUnpickler(io.BytesIO(global_pickle("torch", "bfloat16")), "f").load() is torch.bfloat16
    assert MetadataUnpickler(io.BytesIO(pickle.dumps(torch.float16, protocol=2)), "f").load() is torch.float16


def test_persistent_ids_are_refused():
    data = b"\x80\x02(X\x03\x00\x00\x00keyq\x00tQ."  # BINPERSID on a tuple
    with pytest.raises(UnsafeFileError, match="a persistent object"):
        MetadataUnpickler(io.BytesIO(data), "f").load()


def dcp_with_a_byte_item(folder):
    """A torch.distributed.checkpoint folder (one process, no group) holding a tensor and a plain dict,
    which dcp stores as a pickled byte item; returns the folder's .metadata path and the item's index."""
    import torch
    import torch.distributed.checkpoint as dcp
    dcp.save({"weight": torch.ones(3), "extra": {"step": 7}}, checkpoint_id=str(folder))
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    (key,) = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    (index,) = [i for i in metadata.storage_data if i.fqn == key]
    return metadata, index


def rewrite_item(folder, metadata, index, **changes):
    import dataclasses
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], **changes)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_an_untouched_dcp_folder_passes_the_audit(tmp_path):
    from megatron_moca.safe_load import audit_torch_dcp
    dcp_with_a_byte_item(tmp_path / "ckpt")
    audit_torch_dcp(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("relative", ["../ckpt2/__0_0.distcp", "../ckpt/../ckpt2/__0_0.distcp", "sub/__0_0.distcp"])
def test_a_byte_item_in_a_sibling_folder_sharing_the_prefix_is_refused(relative, tmp_path):
    """`ckpt2` starts with `ckpt`: a prefix comparison would read a file outside the checkpoint."""
    import shutil
    from megatron_moca.errors import UserError
    from megatron_moca.safe_load import audit_torch_dcp
    folder = tmp_path / "ckpt"
    metadata, index = dcp_with_a_byte_item(folder)
    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / metadata.storage_data[index].relative_path, target)
    rewrite_item(folder, metadata, index, relative_path=relative)
    with pytest.raises(UserError, match=r"/\.metadata: item .* points outside the checkpoint folder"):
        audit_torch_dcp(str(folder))


@pytest.mark.parametrize("where", ["starts before the file", "ends one byte past the file", "one byte too long",
                                   "negative length"])
def test_a_byte_item_outside_its_file_is_refused(where, tmp_path):
    """The item's bytes must lie within its file: a byte before the start or one past the end is refused."""
    import os
    from megatron_moca.errors import UserError
    from megatron_moca.safe_load import audit_torch_dcp
    folder = tmp_path / "ckpt"
    metadata, index = dcp_with_a_byte_item(folder)
    info = metadata.storage_data[index]
    size = os.path.getsize(folder / info.relative_path)
    offset, length = {"starts before the file": (-1, info.length),
                      "ends one byte past the file": (size - info.length + 1, info.length),
                      "one byte too long": (info.offset, size - info.offset + 1),
                      "negative length": (info.offset, -1)}[where]
    rewrite_item(folder, metadata, index, offset=offset, length=length)
    with pytest.raises(UserError, match=rf"bytes {offset}\.\.{offset + length} lie outside the {size}-byte file"):
        audit_torch_dcp(str(folder))
