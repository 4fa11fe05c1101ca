"""Shared fixtures: tiny configs, random HF checkpoints, the moca CLI in a subprocess."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env():
    """The environment for child processes: no torch.distributed variables of this process."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def run_moca(*args, timeout=600):
    """Run the `moca` CLI in a fresh process (dist-checkpoint saves spawn workers)."""
    env = child_env()
    return subprocess.run([sys.executable, "-m", "megatron_moca.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def run_torchrun(nproc, script, *args, timeout=600):
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def tiny_config(**language):
    from megatron_moca.config.model import preset

    cfg = preset("tiny")
    for k, v in language.items():
        setattr(cfg.language, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny Qwen2.5-VL folder in the legacy layout, sharded in two files, with side files."""
    from megatron_moca.conversion.random_hf import write_random_hf

    folder = str(tmp_path_factory.mktemp("hf") / "tiny")
    write_random_hf(folder, tiny_config(), torch.float32, seed=1, max_shard_bytes=24 * 2**20)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        f.write('{"min_pixels": 200704, "max_pixels": 802816}\n')
    return folder


@pytest.fixture(scope="session")
def tiny_mcore_dir(tiny_hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mcore") / "ckpt")
    proc = run_moca("convert", "hf-to-mcore", "--hf", tiny_hf_dir, "--output", out, "--tp", "2", "--pp", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def megatron_runtime():
    """One-process megatron parallel state (gloo on CPU) for in-process model tests."""
    from megatron_moca.distributed import runtime

    layout = runtime.initialize(1, 1, seed=1234)
    yield layout
    runtime.shutdown()
