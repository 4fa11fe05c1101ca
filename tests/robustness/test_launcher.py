"""A torchrun job on 2 ranks: a preemption signal that reaches one rank only stops both at the same step boundary
after one collective save; kill -9 of the launcher's process group leaves no rank alive 5 s later (torchrun
starts each rank in a session of its own, so only their own request to die with the agent ends them)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import REPO, assert_helpers_gone, child_env, tiny_finetune_args, write_pairs

pytestmark = pytest.mark.slow


def torchrun(args, save):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_moca.cli", *args, f"checkpoint.save={save}"]
    return subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's launcher has


def ranks_of(agent):
    """The two rank processes under torchrun (their command runs megatron_moca.cli), once both are up."""
    deadline = time.time() + 120
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(agent.pid).children()
                 if any("megatron_moca.cli" in part for part in p.cmdline())]
        if len(ranks) == 2:
            return ranks
        time.sleep(0.05)
    raise AssertionError("torchrun did not start two ranks")


def wait_for_step(save, step, agent):
    path, deadline = os.path.join(save, "metrics.jsonl"), time.time() + 300
    while time.time() < deadline and agent.poll() is None:
        if os.path.isfile(path) and any(json.loads(line)["step"] >= step for line in open(path) if line.endswith("\n")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} logged: {agent.stderr.read()[-3000:] if agent.poll() is not None else ''}")


def test_a_signal_on_one_rank_stops_both_after_one_save_and_killing_the_launcher_ends_every_rank(tiny_hf_dir,
                                                                                                  tmp_path):
    pairs = write_pairs(tmp_path / "pairs", text_rows=8, image_rows=8)
    args = [*tiny_finetune_args(tiny_hf_dir, pairs), "train.train_iters=40", "checkpoint.save_interval=100"]
    save = str(tmp_path / "run")
    agent = torchrun(args, save)
    ranks = ranks_of(agent)
    wait_for_step(save, 1, agent)
    ranks[1].send_signal(signal.SIGUSR1)  # Slurm's --signal=USR1@T: this rank only, the other must follow it
    out, err = agent.communicate(timeout=300)
    stopped = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert 1 <= stopped < 40, err[-3000:]
    line = (f"moca: stopped on SIGUSR1 after saving iteration {stopped} to {save}/iter_{stopped:07d}; rerun the "
            "same command to resume")
    assert err.count(line) == 2, err[-3000:]  # both ranks stopped at the same boundary, after the same save
    assert sorted(n for n in os.listdir(os.path.join(save, f"iter_{stopped:07d}")) if n.startswith("rng_rank")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    assert agent.returncode != 0  # the job did not finish: its launcher says so

    agent = torchrun(args, save)  # the same command resumes ... and its launcher is killed with kill -9
    ranks = ranks_of(agent)
    wait_for_step(save, stopped + 1, agent)
    helpers = ranks + [c for r in ranks for c in r.children(recursive=True)]
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait(30)
    try:
        assert_helpers_gone(helpers, within=5.0)
    finally:  # a failure must not leave ranks training for the rest of the suite
        for process in helpers:
            try:
                process.kill()
            except psutil.Error:
                pass


def test_srun_without_torchrun_is_refused_in_one_line(tiny_hf_dir, tmp_path):
    """`srun --ntasks 4 python -m megatron_moca.cli finetune ...` (no torchrun): every task would train alone as
    a world of one on the same GPU; each is refused before its process group starts."""
    from helpers import run_moca

    pairs = write_pairs(tmp_path / "pairs", text_rows=4, image_rows=2)
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={tmp_path / 'r'}",
                    "train.global_batch_size=4", env={"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("moca: error: started by srun as task 2 of 4 without torchrun")
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")
