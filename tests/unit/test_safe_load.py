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
