"""Megatron dist checkpoints of MocaVLM (torch_dist: reshards to any TP/PP on load).

Layout (shared by the converter and the trainers):
  <dir>/iter_0000100/                 megatron dist checkpoint + moca_model.json (the ModelConfig)
  <dir>/latest_checkpointed_iteration.txt   the newest complete iteration, replaced atomically
A checkpoint argument may name the run directory (the latest iteration is taken) or one iter_ folder.
"""

from __future__ import annotations

import json
import os
import re

import torch.distributed as dist

from megatron_moca.config.model import ModelConfig
from megatron_moca.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_JSON = "moca_model.json"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def resolve_checkpoint(path: str) -> str:
    """The iter_ folder a user path names (run dir -> its latest complete iteration)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint directory does not exist")
    if re.fullmatch(r"iter_\d{7}", os.path.basename(os.path.normpath(path))):
        folder = path
    else:
        tracker = os.path.join(path, TRACKER)
        if not os.path.isfile(tracker):
            raise UserError(f"{path}: no {TRACKER}; pass a run directory or one of its iter_ folders")
        text = open(tracker).read().strip()
        if not text.isdigit():
            raise UserError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
        folder = iteration_dir(path, int(text))
    if not os.path.isfile(os.path.join(folder, MODEL_JSON)) or not os.path.isfile(os.path.join(folder, "metadata.json")):
        raise UserError(f"{folder}: not a complete megatron_moca checkpoint (needs {MODEL_JSON} and metadata.json)")
    return folder


def read_model_config(folder: str) -> ModelConfig:
    with open(os.path.join(folder, MODEL_JSON)) as f:
        return ModelConfig.from_dict(json.load(f)["model"])


def save_model(model, cfg: ModelConfig, root: str, iteration: int, extra: dict = None) -> str:
    """Collective: every rank calls it. Writes iter folder, then moves the tracker (atomic)."""
    from megatron.core import dist_checkpointing

    folder = iteration_dir(root, iteration)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(folder, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), folder)
    if rank0:
        with open(os.path.join(folder, MODEL_JSON), "w") as f:
            json.dump({"model": cfg.to_dict(), **(extra or {})}, f, indent=2)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
    if dist.is_initialized():
        dist.barrier()
    return folder


def load_model(model, folder: str) -> None:
    """Load a dist checkpoint into `model` (any TP/PP: megatron reshards)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), folder)
    model.load_state_dict(state, strict=True)
