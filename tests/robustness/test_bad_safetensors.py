"""Hand-made malformed safetensors files and indexes: each is one UserError naming the file and what is
wrong, raised while reading the header - before anything is allocated from sizes the header claims."""

import json
import struct

import pytest
import torch

from megatron_moca.conversion.hf_io import SafetensorsReader, write_safetensors
from megatron_moca.errors import UserError


def st_file(path, header, data=b""):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
CASES = [
    ("short", None, "shorter than its header"),
    ("huge_header", "huge", "header length"),
    ("not_json", b"{oops", "bad header"),
    ("a_list", [1, 2], "the header is not a JSON object"),
    ("no_dtype", {"w": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'w' has no known dtype"),
    ("odd_dtype", {"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, "has no known dtype"),
    ("negative_dim", {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "has a bad shape"),
    ("float_dim", {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "has a bad shape"),
    ("bad_offsets", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "has bad data_offsets"),
    ("past_the_end", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "is truncated or malformed"),
    ("one_past_the_end", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [5, 9]}}, "is truncated or malformed"),
    ("negative_start", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "is truncated or malformed"),
    ("end_before_start", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, "is truncated or malformed"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "tensors 'a' and 'b' overlap"),
    # 2**40 elements claimed for 8 bytes: refused from the header, nothing allocated
    ("absurd_shape", {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 8]}},
     "holds 8 bytes, its shape [1048576, 1048576] needs 4398046511104"),
]


@pytest.mark.parametrize("name, header, message", CASES, ids=[c[0] for c in CASES])
def test_malformed_header_is_one_line(name, header, message, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02")
    elif header == "huge":
        path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    else:
        st_file(path, header, b"\0" * 8)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated before the header was checked"))
    with pytest.raises(UserError) as err:
        SafetensorsReader(str(tmp_path))
    assert str(err.value).startswith(f"{path}: not a readable safetensors file") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_good_file_still_reads(tmp_path):
    write_safetensors(str(tmp_path / "model.safetensors"), {"w": torch.arange(3.0), "v": torch.ones(2, 0),
                                                           "u": torch.tensor([7], dtype=torch.int64)})
    reader = SafetensorsReader(str(tmp_path))
    assert torch.equal(reader.get("w"), torch.arange(3.0)) and reader.get("v").shape == (2, 0)
    assert reader.get("u").tolist() == [7]  # adjacent spans (end == next start) and empty tensors are fine
    # the last byte of the data section is a tensor's last byte: the bound is inclusive
    (tmp_path / "edge").mkdir()
    st_file(tmp_path / "edge" / "model.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            struct.pack("<2f", 1.5, -2.0))
    assert SafetensorsReader(str(tmp_path / "edge")).get("w").tolist() == [1.5, -2.0]


@pytest.mark.parametrize("index, message", [
    ('{"weight_map": {"w": "../outside.safetensors"}}', "names a file outside the folder ('../outside.safetensors')"),
    ('{"weight_map": ["w"]}', "not a safetensors index (AttributeError"),
    ('{"weights": {}}', "not a safetensors index (KeyError"),
    ('{"weight_map": {"w": "model-1.safetensors"}}', "model-1.safetensors: listed in model.safetensors.index.json but missing"),
])
def test_malformed_index_is_one_line(index, message, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match=None) as err:
        SafetensorsReader(str(tmp_path))
    assert message in str(err.value), str(err.value)
