"""After a resume the random-number generators are where the interrupted run left them, in both stages:
the states a checkpoint restores equal the ones it saved (python, numpy, torch, and stage 1's model-
parallel RNG tracker), even after the process drew more numbers in between. (With dropout 0 a run that
forgot to restore them would still log the same losses: this checks the states themselves.)"""

import os
import random

import numpy as np
import torch

from helpers import REPO, write_stage1_shards


def _draw():
    """Move every generator on, as a process that kept training would."""
    random.random(), np.random.normal(), torch.rand(3)


def _equal_states(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_stage1_checkpoint_restores_the_rng_states(megatron_runtime, tmp_path, monkeypatch):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_moca.config.pretrain import load_pretrain_config
    from megatron_moca.training.optimizer import prime_optimizer_state, setup
    from megatron_moca.training.pretrain import build_model
    from megatron_moca.training.rng import process_rng_state
    from megatron_moca.training.state import load_training_checkpoint, save_training_checkpoint

    from megatron_moca import compat

    # the pytest process must not keep megatron's checkpoint Manager server (compat.tie_helpers_to_this_process)
    # alive for the later tests' worker pools: the saves here need no helper that outlives a kill
    monkeypatch.setattr(compat, "_applied", compat._applied | {"tie_helpers_to_this_process"})
    shards = write_stage1_shards(tmp_path / "shards", documents=4)
    cfg = load_pretrain_config(os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml"),
                               [f"data.paths={shards}", f"checkpoint.save={tmp_path / 'run'}"])
    model = build_model(cfg, torch.device("cpu"))
    _, optimizer, scheduler = setup(cfg, model)
    prime_optimizer_state(optimizer)  # the state a trained step leaves (the distributed optimizer saves its count)
    _draw()
    saved = {**process_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    save_training_checkpoint(cfg, megatron_runtime, model, optimizer, scheduler, 3, {"step": 6, "counts": [6]})
    _draw()
    with get_cuda_rng_tracker().fork():
        torch.rand(4)  # the model-parallel stream moves on too
    assert not _equal_states(saved, {**process_rng_state(), "tracker": get_cuda_rng_tracker().get_states()})
    resumed = load_training_checkpoint(cfg, megatron_runtime, model, optimizer, scheduler)
    assert resumed.iteration == 3 and resumed.loader_state["step"] == 6
    assert _equal_states(saved, {**process_rng_state(), "tracker": get_cuda_rng_tracker().get_states()})


def test_stage2_checkpoint_restores_the_rng_states(megatron_runtime, tiny_hf_dir, tmp_path):
    from megatron_moca.conversion.hf_io import load_transformers_model
    from megatron_moca.training.finetune_state import load_optimizer_and_rng, save_checkpoint
    from megatron_moca.training.rng import process_rng_state

    model = load_transformers_model(tiny_hf_dir, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _draw()
    saved = process_rng_state()
    folder = save_checkpoint(str(tmp_path / "run"), tiny_hf_dir, model, optimizer, 2, {"model_path": tiny_hf_dir})
    _draw()
    assert not _equal_states(saved, process_rng_state())
    load_optimizer_and_rng(folder, optimizer)
    assert _equal_states(saved, process_rng_state())
