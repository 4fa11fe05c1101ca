"""HF folders the project writes name no remote code they do not ship: a base model's auto_map entries are
dropped unless the module file is in the folder."""

import json

from megatron_moca.conversion.hf_io import copy_side_files, drop_unshipped_auto_map


def test_auto_map_entries_without_their_code_are_dropped(tmp_path):
    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    out.mkdir()
    (base / "tokenizer.json").write_text("{}")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.Fast", None]},
                                                            "model_max_length": 8}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl",
        "auto_map": {"AutoModel": "modeling_base.BaseModel", "AutoConfig": "org/repo--configuration_x.XConfig",
                     "AutoProcessor": "shipped.Processor"}}))
    (out / "shipped.py").write_text("class Processor: pass\n")
    copied = copy_side_files(str(base), str(out))
    assert "tokenizer_config.json" in copied
    config = json.load(open(out / "config.json"))
    assert config["auto_map"] == {"AutoProcessor": "shipped.Processor"} and config["model_type"] == "qwen2_5_vl"
    assert "auto_map" not in json.load(open(out / "tokenizer_config.json"))
    assert json.load(open(out / "tokenizer_config.json"))["model_max_length"] == 8
    before = (out / "config.json").read_bytes()
    drop_unshipped_auto_map(str(out))  # nothing more to drop: the file is left as it is
    assert (out / "config.json").read_bytes() == before
