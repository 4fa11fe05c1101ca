"""Shared fixtures: random HF checkpoints, a converted checkpoint, the one-process megatron runtime.
Plain helpers live in helpers.py (a module name no other conftest.py can shadow)."""

import glob
import os

import pytest
import torch
from helpers import run_moca, tiny_config

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


def real_image_paths():
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.endswith((".png", ".jpg", ".jpeg")))


@pytest.fixture(scope="session")
def real_images():
    paths = real_image_paths()
    assert len(paths) >= 20, "scikit-image's data folder should hold its sample images"
    return paths
