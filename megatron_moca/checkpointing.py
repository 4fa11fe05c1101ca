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
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_moca.config.model import ModelConfig
from megatron_moca.errors import UserError
from megatron_moca.safe_load import audit_dist_checkpoint, load_json

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_JSON = "moca_model.json"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration recorded in root's tracker file; None where there is none."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def write_tracker(root: str, iteration: int) -> None:
    """Point root's tracker at `iteration` (atomically: a reader sees the old or the new number)."""
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, os.path.join(root, TRACKER))


def resolve_checkpoint(path: str) -> str:
    """The iter_ folder a user path names (run dir -> its latest complete iteration), after checking
    that every pickle in it holds only data (safe_load.audit_dist_checkpoint): every load path of a
    megatron checkpoint (resume, checkpoint.load, conversion, verify) starts here."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: checkpoint directory does not exist")
    if re.fullmatch(r"iter_\d{7}", os.path.basename(os.path.normpath(path))):
        folder = path
    else:
        iteration = read_tracker(path)
        if iteration is None:
            raise UserError(f"{path}: no {TRACKER}; pass a run directory or one of its iter_ folders")
        folder = iteration_dir(path, iteration)
    if not os.path.isfile(os.path.join(folder, MODEL_JSON)) or not os.path.isfile(os.path.join(folder, "metadata.json")):
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):  # finetune_state.STATE_FILE
            kind = "an FSDP" if os.path.isfile(os.path.join(folder, ".metadata")) else "a replicated"
            raise UserError(f"{folder}: {kind} stage-2 (moca finetune) checkpoint, not a megatron one: stage 2 "
                            "trains Hugging Face weights - its run's release/ folder is the model (no conversion "
                            "needed)")
        raise UserError(f"{folder}: not a complete megatron_moca checkpoint (needs {MODEL_JSON} and metadata.json)")
    audit_dist_checkpoint(folder)
    return folder


def checkpoint_has_prefix(folder: str, prefix: str) -> bool:
    """Whether the dist checkpoint in `folder` holds any tensor whose key starts with `prefix`."""
    from megatron.core import dist_checkpointing

    return any(key.startswith(prefix) for key in dist_checkpointing.load_tensors_metadata(folder))


def read_checkpoint_json(folder: str) -> dict:
    """moca_model.json of an iter_ folder (the ModelConfig, and a trainer's layout and schedule)."""
    path = os.path.join(folder, MODEL_JSON)
    meta = load_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{path}: expected an object with a 'model' object")
    return meta


def read_model_config(folder: str) -> ModelConfig:
    model = read_checkpoint_json(folder)["model"]
    # checkpoints written before VisionConfig.intermediate_pad_multiple existed hold the unpadded MLP
    model.setdefault("vision", {}).setdefault("intermediate_pad_multiple", 1)
    return ModelConfig.from_dict(model)


def _materialize_views_releasing_params(sharded_state_dict, model) -> None:
    """Give every saved tensor its own storage, then free the parameter it was a view of.

    megatron's writer clones views (e.g. the gate/up halves of a SwiGLU fc1) all at once before
    writing: about +60% host memory for a 3B model. Done here parameter by parameter and releasing
    each parameter after its views are copied, the peak stays near one model copy. The model is
    unusable afterwards: for one-shot writers (the converter) only.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    apply_factories(sharded_state_dict)
    by_storage = {}
    for sh in nested_values(sharded_state_dict):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            by_storage.setdefault(sh.data.untyped_storage().data_ptr(), []).append(sh)
    for param in model.parameters():
        group = by_storage.get(param.untyped_storage().data_ptr(), [])
        if any(sh.data.untyped_storage().size() != sh.data.numel() * sh.data.element_size() for sh in group):
            for sh in group:
                sh.data = sh.data.detach().clone()
            param.data = torch.empty(0, dtype=param.dtype)


def save_model(model, cfg: ModelConfig, root: str, iteration: int, extra: dict = None,
               release_params: bool = False, training_state: Optional[Callable[[dict], dict]] = None,
               content_metadata: Optional[dict] = None, sharded_strategy=None) -> str:
    """Collective: every rank calls it. Writes iter folder, then moves the tracker (atomic), so a
    folder named by the tracker is always complete.

    release_params: bound host memory by freeing parameters as they are staged (model unusable after).
    training_state: model sharded state dict -> more sharded state saved beside it (a trainer's
    optimizer, schedule, data position); the model's tensors keep their keys, so `load_model` and the
    converter read a training checkpoint like any other. extra: more JSON for moca_model.json.
    sharded_strategy: megatron's save strategy (None: its default; the trainer passes the fully parallel one).
    """
    from megatron.core import dist_checkpointing

    from megatron_moca.compat import tie_helpers_to_this_process

    tie_helpers_to_this_process()  # megatron's writer processes must not outlive a killed run
    folder = iteration_dir(root, iteration)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(folder, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = model.sharded_state_dict()
    if release_params:
        _materialize_views_releasing_params(state, model)
    if training_state is not None:
        state = {"model": state, **training_state(state)}
    dist_checkpointing.save(state, folder, sharded_strategy=sharded_strategy, content_metadata=content_metadata)
    if rank0:
        with open(os.path.join(folder, MODEL_JSON), "w") as f:
            json.dump({"model": cfg.to_dict(), **(extra or {})}, f, indent=2)
        write_tracker(root, iteration)
    if dist.is_initialized():
        dist.barrier()
    return folder


def load_model(model, folder: str, without: Tuple[str, ...] = ()) -> None:
    """Load a dist checkpoint into `model` in place (any TP/PP: megatron reshards). `without`: key
    prefixes of parameters the checkpoint does not hold and that keep their values (e.g. "mae_decoder."
    when stage 1 starts from a converted backbone).

    Factories (SwiGLU gate/up halves, ...) are applied up front, so every tensor megatron loads is
    the parameter itself or a view of it: no merged temporaries, the peak stays near one model copy
    (a plain load + load_state_dict peaks ~1.5x). Any tensor the loader did not fill in place is
    copied into its parameter.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sharded = {key: value for key, value in model.sharded_state_dict().items() if not key.startswith(without)}
    apply_factories(sharded)
    targets = {key: value for key, value in sharded.items()}
    # tensors of the model that the checkpoint lacks (megatron's "unexpected" keys) are reported here;
    # otherwise torch's loader fails on them with a BaseException (CheckpointException)
    loaded, _, absent = dist_checkpointing.load(sharded, folder, strict=StrictHandling.RETURN_UNEXPECTED)
    if absent:
        hint = (" - it has no MAE decoder (a converted backbone?): load with without=('mae_decoder.',), then "
                "models.heads.initialize_mae_decoder" if all(k.startswith("mae_decoder.") for k in absent) else "")
        raise UserError(f"{folder}: the checkpoint lacks {len(absent)} tensors of this model, e.g. "
                        f"{sorted(absent)[:2]}{hint}")
    missing = set(targets) - set(loaded)
    if missing:
        raise RuntimeError(f"{folder}: keys not loaded {sorted(missing)[:3]}")
    objects = {}  # non-tensor state (e.g. TE's FP8 metadata in `_extra_state`) goes through load_state_dict
    with torch.no_grad():
        for key, target in targets.items():
            pairs = zip(target, loaded[key]) if isinstance(target, list) else [(target, loaded[key])]
            for sh, value in pairs:
                if not isinstance(sh, ShardedTensor):
                    objects[key] = value
                elif isinstance(value, torch.Tensor) and value.data_ptr() != sh.data.data_ptr():
                    sh.data.copy_(value)
    if objects:
        result = model.load_state_dict(objects, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"{folder}: unexpected keys {result.unexpected_keys[:3]}")


def fully_parallel_save_strategy():
    """megatron's fully parallel save over this rank's data-parallel group: each rank writes 1/DP of the tensors
    its replica shares (Megatron-LM's default, training/checkpointing.py)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _data_parallel_group())


def fully_parallel_load_strategy(folder: str):
    """megatron's fully parallel load of the iter_ folder `folder`: each data-parallel rank reads 1/DP of the
    replicated tensors and the ranks exchange them (--ckpt-fully-parallel-load in Megatron-LM)."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(folder), _data_parallel_group())


def _data_parallel_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)
