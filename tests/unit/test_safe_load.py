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


class RunsCode:
    """Pickles as a call of os.getcwd: harmless, but a call all the same, which loading must refuse."""

    def __reduce__(self):
        import os
        return os.getcwd, ()


def two_byte_items(folder):
    """A dcp folder of two pickled items, the first at offset 0 and the second ending at the file's end."""
    import torch.distributed.checkpoint as dcp
    dcp.save({"a": {"x": 1}, "b": {"y": [2, 3]}}, checkpoint_id=str(folder))
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    first, second = sorted(metadata.storage_data, key=lambda i: metadata.storage_data[i].offset)
    return metadata, first, second


def test_items_at_the_very_start_and_end_of_their_file_pass(tmp_path):
    import os
    from megatron_moca.safe_load import audit_torch_dcp
    metadata, first, second = two_byte_items(tmp_path / "ckpt")
    a, b = metadata.storage_data[first], metadata.storage_data[second]
    assert a.offset == 0 and b.offset + b.length == os.path.getsize(tmp_path / "ckpt" / b.relative_path)
    audit_torch_dcp(str(tmp_path / "ckpt"))


def test_a_payload_in_the_second_item_of_a_file_is_refused(tmp_path):
    """Each item is read at its own offset (the first one's bytes are harmless)."""
    import io
    import torch
    from megatron_moca.safe_load import audit_torch_dcp
    folder = tmp_path / "ckpt"
    metadata, first, second = two_byte_items(folder)
    info = metadata.storage_data[second]
    payload = io.BytesIO()
    torch.save(RunsCode(), payload)
    with open(folder / info.relative_path, "r+b") as f:
        f.truncate(info.offset)
        f.seek(info.offset)
        f.write(payload.getvalue())
    rewrite_item(folder, metadata, second, length=len(payload.getvalue()))
    with pytest.raises(UnsafeFileError, match=r"__0_0\.distcp \(item b\.y\): refused to load: it asks for posix\.getcwd"):
        audit_torch_dcp(str(folder))


def test_only_a_non_empty_extra_state_counts_as_a_payload():
    import io
    import torch
    from megatron_moca.safe_load import _holds_bytes
    assert not _holds_bytes(None) and not _holds_bytes(io.BytesIO()) and not _holds_bytes(torch.empty(0))
    assert not _holds_bytes([None, io.BytesIO(), torch.empty(0, dtype=torch.uint8)])
    assert _holds_bytes(io.BytesIO(b"x")) and _holds_bytes(torch.zeros(1, dtype=torch.uint8))
    assert _holds_bytes((None, io.BytesIO(b"x"))) and _holds_bytes([torch.empty(0), torch.ones(2)])


def test_load_weights_only_names_the_file_and_the_problem(tmp_path):
    import torch
    from megatron_moca.errors import UserError
    from megatron_moca.safe_load import load_weights_only
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "rng": torch.arange(4)}, path)
    loaded = load_weights_only(str(path))
    assert loaded["step"] == 3 and torch.equal(loaded["rng"], torch.arange(4))
    with pytest.raises(UserError) as err:
        load_weights_only(str(tmp_path / "absent.pt"))
    assert str(err.value) == f"{tmp_path / 'absent.pt'}: missing"
    path.write_bytes(path.read_bytes()[:300])  # cut short: torch's zip reader fails
    with pytest.raises(UserError) as err:
        load_weights_only(str(path), "the optimizer state")
    with pytest.raises(RuntimeError) as raw:
        torch.load(str(path), weights_only=True)
    first_line = str(raw.value).splitlines()[0]
    assert len(first_line) > 200  # so the cut shows
    assert str(err.value) == f"the optimizer state: not a readable torch file (RuntimeError: {first_line[:200]})"
    torch.save(RunsCode(), path)
    with pytest.raises(UnsafeFileError) as err:
        load_weights_only(str(path))
    assert str(err.value).startswith(f"{path}: refused to load: it asks for posix.getcwd, which is not checkpoint data")


def test_a_persistent_id_is_shown_by_its_first_60_characters():
    class WithPersistentId(pickle.Pickler):
        def persistent_id(self, obj):
            return "p" * 100 if obj == "stored elsewhere" else None

    data = io.BytesIO()
    WithPersistentId(data, protocol=2).dump(["stored elsewhere"])
    with pytest.raises(UnsafeFileError) as err:
        MetadataUnpickler(io.BytesIO(data.getvalue()), "m").load()
    assert str(err.value).startswith(f"m: refused to load: it asks for a persistent object {'p' * 60!r}, ")
