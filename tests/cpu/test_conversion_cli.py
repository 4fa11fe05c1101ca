"""`moca convert`: HF -> Megatron -> HF, verify, and bad input (one-line errors, nothing overwritten)."""

import glob
import json
import os
import shutil

import pytest
import torch
from helpers import run_moca
from safetensors.torch import load_file, save_file

from megatron_moca.cli import main


def read_all(folder):
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


def assert_one_line_error(capsys, rc, fragment):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("moca: error:") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err


def test_converted_checkpoint_layout(tiny_mcore_dir):
    assert open(os.path.join(tiny_mcore_dir, "latest_checkpointed_iteration.txt")).read() == "0"
    meta = json.load(open(os.path.join(tiny_mcore_dir, "iter_0000000", "moca_model.json")))
    assert meta["target_layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    assert meta["model"]["attention"] == "bidirectional"
    assert not [p for p in os.listdir(os.path.dirname(tiny_mcore_dir)) if ".partial-" in p]


def test_verify_passes_on_a_faithful_conversion(tiny_hf_dir, tiny_mcore_dir):
    proc = run_moca("convert", "verify", "--hf", tiny_hf_dir, "--checkpoint", tiny_mcore_dir, "--tolerance", "1e-4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4


def test_verify_fails_clearly_on_a_tampered_tensor(tiny_hf_dir, tiny_mcore_dir, tmp_path):
    tampered = str(tmp_path / "tampered")
    shutil.copytree(tiny_hf_dir, tampered)
    index = json.load(open(os.path.join(tampered, "model.safetensors.index.json")))["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = os.path.join(tampered, index[name])
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, shard, metadata={"format": "pt"})
    proc = run_moca("convert", "verify", "--hf", tampered, "--checkpoint", tiny_mcore_dir)
    assert proc.returncode == 1
    assert name in proc.stderr and "differ" in proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1].split("=")[1]) > 1e-3


def test_mcore_to_hf_round_trip_is_bit_identical(tiny_hf_dir, tiny_mcore_dir, tmp_path):
    out = str(tmp_path / "back")
    base = str(tmp_path / "base")  # the base folder with a vision_config field the model config does not hold
    shutil.copytree(tiny_hf_dir, base)
    config = json.load(open(os.path.join(base, "config.json")))
    config["vision_config"]["tokens_per_second"] = 4
    json.dump(config, open(os.path.join(base, "config.json"), "w"))
    proc = run_moca("convert", "mcore-to-hf", "--checkpoint", tiny_mcore_dir, "--output", out, "--hf-base",
                    base, "--max-shard-gib", "0.03")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reading " in proc.stderr and "writing HF tensors" in proc.stderr  # progress on stderr, results on stdout
    original, back = read_all(tiny_hf_dir), read_all(out)
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(out, "preprocessor_config.json"))
    exported = json.load(open(os.path.join(out, "config.json")))
    assert exported["vision_config"]["tokens_per_second"] == 4  # the base's
    # the checkpoint records bidirectional attention: so does the export, where transformers reads it
    assert exported["is_causal"] is False and exported["text_config"]["is_causal"] is False
    assert not os.path.exists(os.path.join(out, "moca_embedding.json"))  # a converted model, not a run: no settings
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    loaded = {k: v for k, v in model.state_dict().items() if "lm_head" not in k}
    assert len(loaded) == len(original)


# -- bad input: each is refused before any work, in one line, leaving the output untouched ----------

def test_missing_safetensors(tiny_hf_dir, tmp_path, capsys):
    broken = tmp_path / "nosafetensors"
    broken.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), broken)
    out = tmp_path / "out"
    rc = main(["convert", "hf-to-mcore", "--hf", str(broken), "--output", str(out)])
    assert_one_line_error(capsys, rc, "no model.safetensors")
    assert not out.exists()


def test_missing_shard_listed_in_index(tiny_hf_dir, tmp_path, capsys):
    broken = str(tmp_path / "missingshard")
    shutil.copytree(tiny_hf_dir, broken)
    os.remove(os.path.join(broken, "model-00002-of-00002.safetensors"))
    rc = main(["convert", "hf-to-mcore", "--hf", broken, "--output", str(tmp_path / "out")])
    assert_one_line_error(capsys, rc, "listed in model.safetensors.index.json but missing")


def test_corrupt_safetensors(tiny_hf_dir, tmp_path, capsys):
    broken = str(tmp_path / "corrupt")
    shutil.copytree(tiny_hf_dir, broken)
    shard = os.path.join(broken, "model-00001-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(100)
    rc = main(["convert", "hf-to-mcore", "--hf", broken, "--output", str(tmp_path / "out")])
    assert_one_line_error(capsys, rc, "not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_config_that_is_not_qwen25vl(tiny_hf_dir, tmp_path, capsys):
    broken = str(tmp_path / "llama")
    shutil.copytree(tiny_hf_dir, broken)
    cfg = json.load(open(os.path.join(broken, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(broken, "config.json"), "w"))
    rc = main(["convert", "hf-to-mcore", "--hf", broken, "--output", str(tmp_path / "out")])
    assert_one_line_error(capsys, rc, "is not Qwen2.5-VL")


def test_tp_not_dividing_kv_heads(tiny_hf_dir, tmp_path, capsys):
    rc = main(["convert", "hf-to-mcore", "--hf", tiny_hf_dir, "--output", str(tmp_path / "out"), "--tp", "4"])
    assert_one_line_error(capsys, rc, "must divide the 2 KV heads")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_output_not_empty_is_refused_and_left_alone(tiny_hf_dir, tiny_mcore_dir, tmp_path, capsys, direction):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = ["--hf", tiny_hf_dir] if direction == "hf-to-mcore" else ["--checkpoint", tiny_mcore_dir]
    rc = main(["convert", direction, *src, "--output", str(out)])
    assert_one_line_error(capsys, rc, "not an empty directory")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_missing_checkpoint_and_config(tmp_path, capsys):
    rc = main(["convert", "mcore-to-hf", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert_one_line_error(capsys, rc, "does not exist")
    (tmp_path / "empty").mkdir()
    rc = main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    assert_one_line_error(capsys, rc, "config.json")


def test_convert_commands_hide_the_gpus(monkeypatch):
    """On a GPU node `moca convert` must not build the unsharded model on GPU 0 (or take NCCL)."""
    import os

    from megatron_moca import cli

    seen = {}

    def fake_verify(args):
        seen["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test
    monkeypatch.setattr(cli, "_cmd_verify", fake_verify)
    assert cli.main(["convert", "verify", "--hf", "x", "--checkpoint", "y"]) == 0
    assert seen == {"CUDA_VISIBLE_DEVICES": ""}


def test_a_random_init_export_carries_a_tokenizer_that_autotokenizer_loads(tmp_path):
    """An export of a run that started from random weights has no base folder to copy a tokenizer from:
    the bundled Qwen2.5-VL vocabulary is written, and transformers' AutoTokenizer encodes real text to the
    ids of the project's tokenizer (an empty tokenizer would come back silently otherwise)."""
    from transformers import AutoTokenizer

    from helpers import REPO, write_stage1_shards
    from megatron_moca.data.tokenizer import MASK_TOKEN_ID, QwenTokenizer

    shards = write_stage1_shards(tmp_path / "shards", documents=4)
    run = str(tmp_path / "run")
    proc = run_moca("pretrain", "--config", os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml"),
                    f"data.paths={shards}", f"checkpoint.save={run}", "train.train_iters=1", "optim.lr_warmup_iters=0",
                    "sample.max_length=100", "data.pack_length=128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = str(tmp_path / "hf")
    proc = run_moca("convert", "mcore-to-hf", "--checkpoint", run, "--output", out)
    assert proc.returncode == 0 and "side files: tokenizer.json, tokenizer_config.json" in proc.stdout, proc.stderr
    hf = AutoTokenizer.from_pretrained(out)
    ours = QwenTokenizer()
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()[:4000] + " café 東京 🤖 <|mask|>"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.mask_token_id == MASK_TOKEN_ID and hf.pad_token_id == ours.pad_id and hf.chat_template
    # the run's length and pixel bounds (from its config.yaml), for MocaEmbedder, transformers and
    # sentence-transformers alike
    import yaml

    image = yaml.safe_load(open(os.path.join(run, "config.yaml")))["sample"]["image"]
    processor = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert (processor["min_pixels"], processor["max_pixels"]) == (image["min_pixels"], image["max_pixels"])
    assert json.load(open(os.path.join(out, "moca_embedding.json")))["max_length"] == 100
    assert {"modules.json", "config_sentence_transformers.json", "moca_sentence_transformers.py"} <= set(os.listdir(out))
    training = json.load(open(os.path.join(out, "moca_training.json")))  # and what the run did, in its card
    assert (training["steps"], training["base_model"], training["data"]["paths"]) == (1, "random initialisation", [shards])
    assert training["consumed_tokens"] > 0 and training["hyperparameters"]["max_length"] == 100
    assert "MoCa stage 1" in open(os.path.join(out, "README.md")).read()


def test_the_python_api_converts_both_ways_and_verifies(tiny_hf_dir, tmp_path):
    """megatron_moca.conversion.hf_to_mcore / mcore_to_hf / verify, as README shows them (a fresh process:
    conversion sets up its own one-process megatron runtime)."""
    import subprocess
    import sys

    from helpers import REPO, child_env

    code = (
        "import sys, torch\n"
        "from megatron_moca.conversion import hf_to_mcore, mcore_to_hf, verify\n"
        f"out = hf_to_mcore({tiny_hf_dir!r}, {str(tmp_path / 'mcore')!r}, tp=2)\n"
        "assert out['dtype'] == 'float32', out\n"
        f"back = mcore_to_hf({str(tmp_path / 'mcore')!r}, {str(tmp_path / 'hf')!r}, hf_base={tiny_hf_dir!r})\n"
        f"result = verify({tiny_hf_dir!r}, {str(tmp_path / 'mcore')!r})\n"
        "assert not result.mismatched_tensors and result.max_abs_diff < 1e-3, result\n"
        "print('ok', back['shards'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**child_env(), "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
    from megatron_moca.conversion.hf_io import SafetensorsReader

    ours, theirs = SafetensorsReader(str(tmp_path / "hf")), SafetensorsReader(tiny_hf_dir)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    assert all(torch.equal(ours.get(k), theirs.get(k)) for k in theirs.keys())
