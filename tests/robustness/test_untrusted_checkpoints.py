"""Loading never runs code from a file. Each load path (stage-1 resume and checkpoint.load, `moca convert
mcore-to-hf` / `verify`, stage-2 resume, the embedder behind `moca eval`) is handed a checkpoint with a
pickled payload that would create a marker file; each must refuse with one line naming the file and the
class it asked for, leave the marker absent and the run directory as it was. The allowlist admits what
megatron-core 0.16.1 (installed, written live) and 0.19.2 (fixtures/mcore_0.19.2, written by
tools/checkpoint_pickles.py from a 0.19.2 run) write."""

import glob
import json
import os
import shutil

import pytest
import torch

from helpers import REPO, run_moca, write_pairs, write_stage1_shards

RECIPE = os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml")
STAGE1 = ["sample.max_length=100", "data.pack_length=128", "logging.log_interval=1"]
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


class Payload:
    """Pickles as a call of os.system: unpickling it unrestricted creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def linked_copy(src, dst):
    """A copy of a run directory whose big files are hard links (a test replaces files, never edits them)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def replace_file(path, data: bytes):
    os.unlink(path)  # breaks the hard link: the original run keeps its file
    with open(path, "wb") as f:
        f.write(data)


def torch_payload(marker) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)
    return buf.getvalue()


def snapshot(folder):
    return sorted((os.path.relpath(p, folder), os.path.getsize(p), os.path.getmtime(p))
                  for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p))


def assert_refused(proc, marker, *names):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("moca: error: ") and "refused to load: it asks for posix.system" in last, last
    assert all(name in last for name in names), last
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(marker)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    shards = write_stage1_shards(root / "shards", documents=16)
    save = str(root / "run")
    proc = run_moca("pretrain", "--config", RECIPE, f"data.paths={shards}", f"checkpoint.save={save}", *STAGE1,
                    "train.train_iters=4", "train.exit_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return shards, save


def _byte_items(folder):
    """(name, bytes) of every pickled item in a fixture folder or a live checkpoint folder."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_moca.safe_load import read_checkpoint_metadata

    if os.path.isfile(os.path.join(folder, "items.json")):
        names = json.load(open(os.path.join(folder, "items.json")))
        return [(key, open(os.path.join(folder, "items", name), "rb").read()) for name, key in names.items()]
    metadata = read_checkpoint_metadata(os.path.join(folder, ".metadata"))
    wanted = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    items = []
    for index, info in metadata.storage_data.items():
        if index.fqn in wanted:
            with open(os.path.join(folder, info.relative_path), "rb") as f:
                f.seek(info.offset)
                items.append((index.fqn, f.read(info.length)))
    return items


@pytest.mark.parametrize("version", ["installed", "0.19.2"])
def test_the_allowlist_admits_what_megatron_core_writes(version, stage1_run, tmp_path):
    """Every class in the .metadata and every per-rank object (optimizer groups, loader position, RNG
    states, extra states) of a real training checkpoint passes the restricted readers."""
    import io

    import megatron.core

    from megatron_moca.safe_load import audit_dist_checkpoint, load_weights_only, read_checkpoint_metadata

    if version == "installed":
        folder = os.path.join(stage1_run[1], "iter_0000002")
        assert megatron.core.__version__.startswith("0.16"), "CI runs megatron-core 0.16.1"
        audit_dist_checkpoint(folder)
    else:
        folder = os.path.join(FIXTURES, "mcore_0.19.2")
    metadata = read_checkpoint_metadata(os.path.join(folder, ".metadata"))
    assert any(k.startswith("language.") for k in metadata.state_dict_metadata)
    items = dict((key, load_weights_only(io.BytesIO(data), key)) for key, data in _byte_items(folder))
    loader = items["moca_loader_state/shard_0_1"][0]
    assert {"step", "counts", "skipped"} <= set(loader)
    rng = items["moca_rng_state/shard_0_1"][0]
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["numpy"][1], torch.Tensor)
    assert {"optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1"} <= set(items)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from megatron_moca.safe_load import load_weights_only
    from megatron_moca.training.rng import process_rng_state, set_process_rng_state

    random.random(), np.random.normal(), torch.rand(1)  # numpy with a cached gaussian
    torch.save(process_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist())
    set_process_rng_state(load_weights_only(str(tmp_path / "rng.pt")))
    assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist()) == expected


@pytest.mark.parametrize("target", [".metadata", "common.pt"])
def test_stage1_load_paths_refuse_a_pickled_payload(target, stage1_run, tiny_hf_dir, tmp_path):
    """A payload in the dist checkpoint's .metadata (plain pickle) or common.pt (torch file): refused by
    resume, checkpoint.load, mcore-to-hf and verify, before anything is loaded or written."""
    shards, save = stage1_run
    run = linked_copy(save, str(tmp_path / "run"))
    marker = str(tmp_path / "PWNED")
    path = os.path.join(run, "iter_0000002", target)
    if target == ".metadata":
        import pickle

        replace_file(path, pickle.dumps(Payload(marker)))
    else:
        replace_file(path, torch_payload(marker))
    before = snapshot(run)
    resume = run_moca("pretrain", "--config", RECIPE, f"data.paths={shards}", f"checkpoint.save={run}", *STAGE1,
                      "train.train_iters=4")
    assert_refused(resume, marker, path)
    assert snapshot(run) == before
    start = run_moca("pretrain", "--config", RECIPE, f"data.paths={shards}", f"checkpoint.save={tmp_path / 'new'}",
                     f"checkpoint.load={run}", *STAGE1, "train.train_iters=4")
    assert_refused(start, marker, path)
    assert not os.path.exists(tmp_path / "new")
    export = run_moca("convert", "mcore-to-hf", "--checkpoint", run, "--output", str(tmp_path / "hf"))
    assert_refused(export, marker, path)
    assert not os.path.exists(tmp_path / "hf")
    verify = run_moca("convert", "verify", "--hf", tiny_hf_dir, "--checkpoint", run)
    assert_refused(verify, marker, path)


def test_a_pickled_payload_inside_a_distcp_item_is_refused(stage1_run, megatron_runtime, tmp_path):
    """A per-rank object (where megatron keeps loader positions and RNG states) that holds a payload:
    torch's loader would unpickle it unrestricted; the audit refuses it first, naming file and item."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    marker = str(tmp_path / "PWNED")
    folder = tmp_path / "ckpt" / "iter_0000002"
    folder.mkdir(parents=True)
    dist_checkpointing.save({"weight": ShardedTensor.from_rank_offsets("weight", torch.ones(4)),
                             "rng": ShardedObject("moca_rng_state", Payload(marker), (1,), (0,), replica_id=0)},
                            str(folder))
    shutil.copy(os.path.join(stage1_run[1], "iter_0000002", "moca_model.json"), folder)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    proc = run_moca("convert", "mcore-to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
    assert_refused(proc, marker, "item moca_rng_state/shard_0_1", ".distcp")
    assert not os.path.exists(tmp_path / "hf")


@pytest.fixture(scope="module")
def stage2_run(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    pairs = write_pairs(root / "pairs")
    args = ["finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", "model.compute_dtype=float32",
            "train.global_batch_size=4", "data.max_length=128", "data.num_workers=1", "data.image.min_pixels=3136",
            "data.image.max_pixels=12544", "train.train_iters=3", "train.exit_interval=1"]
    save = str(root / "run")
    proc = run_moca(*args, f"checkpoint.save={save}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args, save


@pytest.mark.parametrize("target", ["optimizer.pt", "rng_rank0.pt"])
def test_stage2_resume_refuses_a_pickled_payload(target, stage2_run, tmp_path):
    args, save = stage2_run
    run = linked_copy(save, str(tmp_path / "run"))
    marker = str(tmp_path / "PWNED")
    path = os.path.join(run, "iter_0000001", target)
    replace_file(path, torch_payload(marker))
    before = snapshot(run)
    proc = run_moca(*args, f"checkpoint.save={run}")
    assert_refused(proc, marker, path)
    assert snapshot(run) == before


def test_the_embedder_and_eval_never_open_a_pickled_weights_file(tiny_hf_dir, tmp_path):
    """An HF folder whose weights are a pytorch_model.bin: transformers would unpickle it; we read
    safetensors only, so `moca eval` refuses the folder in one line and the payload never runs."""
    from megatron_moca.eval.beir import write_beir

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), model)
    marker = str(tmp_path / "PWNED")
    (model / "pytorch_model.bin").write_bytes(torch_payload(marker))
    data = str(tmp_path / "beir")
    write_beir(data, [{"_id": "d1", "text": "a page"}], [{"_id": "q1", "text": "a query"}], ["q1\td1\t1"])
    proc = run_moca("eval", "--model", str(model), "--task", "retrieval", "--data", data)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"moca: error: {model}: transformers cannot load it") and "safetensors" in last, last
    assert "Traceback" not in proc.stderr and not os.path.exists(marker)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b'["a list"]', "expected an object with a 'model' object"),
])
def test_a_garbled_moca_model_json_is_one_line(content, message, stage1_run, tmp_path):
    run = linked_copy(stage1_run[1], str(tmp_path / "run"))
    replace_file(os.path.join(run, "iter_0000002", "moca_model.json"), content)
    proc = run_moca("convert", "mcore-to-hf", "--checkpoint", run, "--output", str(tmp_path / "hf"))
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_te_style_extra_state_payload_needs_explicit_trust(megatron_runtime, tmp_path, monkeypatch):
    """Transformer Engine pickles its FP8 metadata into a module's `_extra_state` and unpickles it
    unrestricted on load: a checkpoint carrying such a payload is refused unless the user trusts it."""
    import pickle

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_moca.safe_load import TRUST_EXTRA_STATE, UnsafeFileError, audit_dist_checkpoint

    marker = str(tmp_path / "PWNED")
    payload = torch.frombuffer(bytearray(pickle.dumps(Payload(marker))), dtype=torch.uint8)
    folder = str(tmp_path / "ckpt")
    os.makedirs(folder)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", torch.ones(2)),
                             "x": ShardedObject("layer.linear._extra_state", payload, (1,), (0,), replica_id=0)},
                            folder)
    monkeypatch.delenv(TRUST_EXTRA_STATE, raising=False)
    with pytest.raises(UnsafeFileError, match=f"item layer.linear._extra_state/shard_0_1\\): holds serialized module "
                                              f"state .* set {TRUST_EXTRA_STATE}=1"):
        audit_dist_checkpoint(folder)
    monkeypatch.setenv(TRUST_EXTRA_STATE, "1")
    audit_dist_checkpoint(folder)  # the user's explicit trust: passed on to TE
    assert not os.path.exists(marker)
