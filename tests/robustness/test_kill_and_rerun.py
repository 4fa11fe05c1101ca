"""kill -9 in the middle of a checkpoint save, a conversion and an export: no helper process outlives the
killed one by more than a few seconds, nothing left behind blocks the rerun of the same command, and
the rerun's result equals that of a run that was never interrupted."""

import json
import os

import pytest

from helpers import REPO, assert_helpers_gone, kill_when, run_moca, write_stage1_shards

RECIPE = os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml")


def metrics(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pretrain_killed_mid_save_resumes_to_the_same_run(tmp_path):
    shards = write_stage1_shards(tmp_path / "shards", documents=24)
    common = ["--config", RECIPE, f"data.paths={shards}", "sample.max_length=100", "data.pack_length=128",
              "logging.log_interval=1", "train.train_iters=6", "checkpoint.save_interval=2", "data.num_workers=2"]
    straight = str(tmp_path / "straight")
    assert run_moca("pretrain", *common, f"checkpoint.save={straight}").returncode == 0
    save = str(tmp_path / "killed")
    tracker, folder = os.path.join(save, "latest_checkpointed_iteration.txt"), os.path.join(save, "iter_0000004")

    def saving_iteration_4():  # files of iteration 4 are being written, the tracker still names 2
        return os.path.isdir(folder) and len(os.listdir(folder)) >= 2 and open(tracker).read().strip() == "2"

    helpers = kill_when(["pretrain", *common, f"checkpoint.save={save}"], saving_iteration_4)
    assert helpers, "the run had loader workers and checkpoint writers to check"
    assert_helpers_gone(helpers)
    with open(os.path.join(save, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1')  # a record cut by the kill: dropped on resume, not fatal
    rerun = run_moca("pretrain", *common, f"checkpoint.save={save}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and "iter_0000002" in rerun.stderr
    keys = ("step", "loss", "mlm_loss", "mae_loss", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in metrics(save)] == [[r[k] for k in keys] for r in metrics(straight)]


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "mcore")
    proc = run_moca("convert", "hf-to-mcore", "--hf", tiny_hf_dir, "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_a_conversion_killed_mid_save_reruns_cleanly(tiny_hf_dir, converted, tmp_path):
    out = str(tmp_path / "mcore")
    staging = str(tmp_path / ".mcore.partial")

    def writing():
        folder = os.path.join(staging, "iter_0000000")
        return os.path.isdir(folder) and any(n.endswith(".distcp") for n in os.listdir(folder))

    helpers = kill_when(["convert", "hf-to-mcore", "--hf", tiny_hf_dir, "--output", out], writing)
    assert_helpers_gone(helpers)
    assert not os.path.exists(out) and os.path.isdir(staging)  # only the staging folder was touched
    rerun = run_moca("convert", "hf-to-mcore", "--hf", tiny_hf_dir, "--output", out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["mcore"]  # the killed run's staging folder was reused and is gone
    verify = run_moca("convert", "verify", "--hf", tiny_hf_dir, "--checkpoint", out)  # every tensor equal to the HF one
    assert verify.returncode == 0 and "differ" not in verify.stderr, verify.stderr[-2000:]


def test_an_export_killed_mid_write_reruns_to_the_same_files(converted, tmp_path):
    straight = str(tmp_path / "straight")
    assert run_moca("convert", "mcore-to-hf", "--checkpoint", converted, "--output", straight,
                    "--max-shard-gib", "0.01").returncode == 0
    out, staging = str(tmp_path / "hf"), str(tmp_path / ".hf.partial")

    def writing():
        return os.path.isdir(staging) and any(n.endswith(".tmp") for n in os.listdir(staging))

    helpers = kill_when(["convert", "mcore-to-hf", "--checkpoint", converted, "--output", out,
                         "--max-shard-gib", "0.01"], writing)
    assert_helpers_gone(helpers)
    rerun = run_moca("convert", "mcore-to-hf", "--checkpoint", converted, "--output", out, "--max-shard-gib", "0.01")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["hf", "straight"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(straight))
    for name in os.listdir(out):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(straight, name), "rb").read(), name


def test_finetune_killed_mid_save_resumes_to_the_same_run(tiny_hf_dir, tmp_path):
    from helpers import write_pairs

    pairs = write_pairs(tmp_path / "pairs", text_rows=8, image_rows=4)
    common = ["finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", "model.compute_dtype=float32",
              "train.global_batch_size=4", "data.max_length=96", "data.num_workers=1", "data.image.min_pixels=3136",
              "data.image.max_pixels=6272", "train.train_iters=4", "checkpoint.save_interval=2", "optim.lr=1e-4",
              "logging.log_interval=1"]
    straight = str(tmp_path / "straight")
    assert run_moca(*common, f"checkpoint.save={straight}").returncode == 0
    save = str(tmp_path / "killed")
    staging = os.path.join(save, "iter_0000004.partial")

    def saving_iteration_4():
        return os.path.isdir(staging) and any(n.endswith(".safetensors") or n.endswith(".tmp")
                                              for n in os.listdir(staging))

    helpers = kill_when([*common, f"checkpoint.save={save}"], saving_iteration_4)
    assert_helpers_gone(helpers)
    rerun = run_moca(*common, f"checkpoint.save={save}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and not os.path.exists(staging)
    keys = ("step", "loss", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in metrics(save)] == [[r[k] for k in keys] for r in metrics(straight)]
