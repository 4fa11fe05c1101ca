"""kill -9 in the middle of a checkpoint save, a conversion and an export: no helper process outlives the
killed one by more than a few seconds, nothing left behind blocks the rerun of the same command, and
the rerun's result equals that of a run that was never interrupted. SIGTERM (preemption) saves at the
next step boundary and the rerun equals the uninterrupted run too; two jobs started together on one run
directory: exactly one runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import (REPO, assert_helpers_gone, child_env, kill_when, run_moca, tiny_finetune_args, write_pairs,
                     write_stage1_shards)

RECIPE = os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml")
KEYS1 = ("step", "loss", "mlm_loss", "mae_loss", "grad_norm", "lr")
KEYS2 = ("step", "loss", "grad_norm", "lr")


def metrics(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def moca_process(*args):
    return subprocess.Popen([sys.executable, "-m", "megatron_moca.cli", *args], env=child_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """The stage-1 command's arguments and its uninterrupted run - started twice at once on one run
    directory, of which exactly one may run (the other is refused in one line)."""
    tmp = tmp_path_factory.mktemp("stage1")
    shards = write_stage1_shards(tmp / "shards", documents=24)
    common = ["--config", RECIPE, f"data.paths={shards}", "sample.max_length=100", "data.pack_length=128",
              "logging.log_interval=1", "train.train_iters=6", "checkpoint.save_interval=2", "data.num_workers=2"]
    straight = str(tmp / "straight")
    both = [moca_process("pretrain", *common, f"checkpoint.save={straight}") for _ in range(2)]
    results = sorted(((p.wait(600), p.stderr.read()) for p in both), key=lambda r: r[0])
    assert [rc for rc, _ in results] == [0, 2], [err[-2000:] for _, err in results]
    refused = results[1][1].strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith(f"moca: error: {straight} is in use by moca pretrain (pid ")
    assert [r["step"] for r in metrics(straight)] == [1, 2, 3, 4, 5, 6]  # one run's records, not two interleaved
    return common, straight


@pytest.fixture(scope="module")
def stage2(tiny_hf_dir, tmp_path_factory):
    """The stage-2 command's arguments and its uninterrupted run."""
    tmp = tmp_path_factory.mktemp("stage2")
    pairs = write_pairs(tmp / "pairs", text_rows=8, image_rows=4)
    common = [*tiny_finetune_args(tiny_hf_dir, pairs), "train.train_iters=4", "checkpoint.save_interval=2"]
    straight = str(tmp / "straight")
    assert run_moca(*common, f"checkpoint.save={straight}").returncode == 0
    return common, straight


def test_pretrain_killed_mid_save_resumes_to_the_same_run(stage1, tmp_path):
    common, straight = stage1
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
    assert [[r[k] for k in KEYS1] for r in metrics(save)] == [[r[k] for k in KEYS1] for r in metrics(straight)]


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


def test_finetune_killed_mid_save_resumes_to_the_same_run(stage2, tmp_path):
    common, straight = stage2
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
    assert [[r[k] for k in KEYS2] for r in metrics(save)] == [[r[k] for k in KEYS2] for r in metrics(straight)]


def sigterm_when_logged(args, save, step):
    """Start `moca *args`, send SIGTERM once metrics.jsonl holds `step`; returns (exit code, stderr)."""
    proc = moca_process(*args)
    path, deadline = os.path.join(save, "metrics.jsonl"), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.isfile(path) and any(json.loads(line)["step"] >= step for line in open(path) if line.endswith("\n")):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    return proc.wait(300), proc.stderr.read()


@pytest.mark.parametrize("which", ["stage1"])  # stage 2 on 2 ranks: tests/robustness/test_launcher.py
def test_sigterm_saves_at_the_next_step_and_the_rerun_equals_an_uninterrupted_run(which, request, tmp_path):
    common, straight = request.getfixturevalue(which)
    args = ["pretrain", *common] if which == "stage1" else list(common)
    keys = KEYS1 if which == "stage1" else KEYS2
    save = str(tmp_path / "preempted")
    args += [f"checkpoint.save={save}", "checkpoint.save_interval=100"]  # no save but the preemption's and the last
    rc, err = sigterm_when_logged(args, save, step=1)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    stopped = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert 1 <= stopped < len(metrics(straight))  # saved at a step boundary after the signal, before the end
    assert err.strip().splitlines()[-1] == (f"moca: stopped on SIGTERM after saving iteration {stopped} to "
                                            f"{save}/iter_{stopped:07d}; rerun the same command to resume")
    assert metrics(save)[-1]["step"] == stopped and not os.path.exists(os.path.join(save, "release"))
    rerun = run_moca(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {save}/iter_{stopped:07d}" in rerun.stderr
    assert [[r[k] for k in keys] for r in metrics(save)] == [[r[k] for k in keys] for r in metrics(straight)]


def test_stage1_resume_refuses_a_changed_batch_or_blend_unless_allowed(stage1, tmp_path):
    common, straight = stage1
    save = str(tmp_path / "copy")
    shutil.copytree(straight, save)
    refused = run_moca("pretrain", *common, f"checkpoint.save={save}", "train.train_iters=8", "train.global_batch_size=4")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"moca: error: {save}/iter_0000006 was trained with train.global_batch_size=2, this run has 4: resume with the "
        "run's own settings (its config.yaml), or set checkpoint.allow_data_change=true to continue with the new ones")
    weights = run_moca("pretrain", *common, f"checkpoint.save={save}", "train.train_iters=8", "data.seed=7")
    assert weights.returncode == 2 and "was trained with data.seed=1234, this run has 7" in weights.stderr
    allowed = run_moca("pretrain", *common, f"checkpoint.save={save}", "train.train_iters=7",
                       "train.global_batch_size=4", "checkpoint.allow_data_change=true")
    assert allowed.returncode == 0 and "resumed from" in allowed.stderr, allowed.stderr[-2000:]
    assert [r["step"] for r in metrics(save)] == [1, 2, 3, 4, 5, 6, 7]


@pytest.fixture()
def small_disk(tmp_path):
    """A 250 MiB tmpfs (room for one tiny stage-1 checkpoint, ~170 MB, not two); skipped where mounting is not
    permitted."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=250m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()[:200]}")
    yield str(folder)
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_while_saving_is_one_line_and_the_last_checkpoint_stays_whole(stage1, small_disk, tmp_path):
    common, _ = stage1
    save = os.path.join(small_disk, "run")
    full = run_moca("pretrain", *common, f"checkpoint.save={save}")
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1] == (
        f"moca: error: the checkpoint of iteration 4 could not be written: no space left on device under {save}; "
        f"the last complete checkpoint is {save}/iter_0000002 - free space and rerun the same command to resume")
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    again = run_moca("pretrain", *common, f"checkpoint.save={save}")  # still full: one line, no temporary file left
    assert again.returncode == 2 and "no space left on device" in again.stderr.strip().splitlines()[-1]
    assert "Traceback" not in again.stderr and not [n for n in os.listdir(save) if n.endswith(".tmp")]
    # the checkpoint the tracker names is whole: it converts (a resume from it is the kill test's business)
    export = run_moca("convert", "mcore-to-hf", "--checkpoint", save, "--output", str(tmp_path / "hf"))
    assert export.returncode == 0 and "iter_0000002" in export.stderr, export.stderr[-2000:]
