"""Training checkpoints: model + optimizer + LR schedule + each data-parallel rank's loader position
+ every rank's RNG, in one megatron dist checkpoint (checkpointing.save_model's layout), so that a
killed run resumes exactly: same rows, same RNG streams, same losses.

Per-rank state is a ShardedObject: loader positions indexed by DP rank (written by TP 0 / PP 0 of each
replica), RNG states indexed by global rank. The run's layout is recorded in moca_model.json; resuming
needs the same data-parallel size (the loader positions are per DP rank) and, unless the optimizer
was saved fully reshardable, the same TP x PP. After Megatron-LM's megatron/training/checkpointing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_moca.checkpointing import (fully_parallel_load_strategy, fully_parallel_save_strategy,
                                         read_checkpoint_json, read_model_config, read_tracker, resolve_checkpoint,
                                         save_model)
from megatron_moca.config.pretrain import PretrainConfig
from megatron_moca.distributed.runtime import ParallelLayout
from megatron_moca.errors import UserError
from megatron_moca.training.optimizer import prime_optimizer_state
from megatron_moca.training.rng import process_rng_state, set_process_rng_state


@dataclass
class Resumed:
    iteration: int
    loader_state: dict
    folder: str
    consumed_tokens: float = 0.0


def data_identity(cfg: PretrainConfig) -> dict:
    """What a resumed stage-1 run must share with the checkpoint's run (checkpoint.allow_data_change waives it)."""
    import os

    d = cfg.data
    return {"global_batch_size": cfg.train.global_batch_size, "paths": [os.path.abspath(p) for p in d.paths],
            "weights": d.weights, "max_samples_per_source": d.max_samples_per_source, "sample_order": d.sample_order,
            "seed": d.seed}


def check_resume_data(cfg: PretrainConfig) -> None:
    """Before anything is built: a resume of checkpoint.save's latest checkpoint must read the same data in the
    same global batches (a UserError naming the first difference, unless checkpoint.allow_data_change)."""
    iteration = read_tracker(cfg.checkpoint.save)
    if iteration is None:
        return
    from megatron_moca.checkpointing import iteration_dir

    folder = iteration_dir(cfg.checkpoint.save, iteration)
    try:
        saved = read_checkpoint_json(folder).get("data")
    except FileNotFoundError:
        return  # resolve_checkpoint names an incomplete checkpoint when the resume loads it
    _check_same_data(cfg, folder, saved)


def _check_same_data(cfg: PretrainConfig, folder: str, saved: Optional[dict]) -> None:
    if saved is None or cfg.checkpoint.allow_data_change:  # checkpoints written before it was recorded
        return
    ours = data_identity(cfg)
    for key, value in ours.items():
        if saved.get(key) != value:
            where = "train" if key == "global_batch_size" else "data"
            raise UserError(f"{folder} was trained with {where}.{key}={saved.get(key)!r}, this run has {value!r}: "
                            "resume with the run's own settings (its config.yaml), or set "
                            "checkpoint.allow_data_change=true to continue with the new ones")


def _optimizer_metadata(cfg: PretrainConfig) -> dict:
    kind = "fully_reshardable" if cfg.checkpoint.optim_fully_reshardable else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind}


def _layout_dict(layout: ParallelLayout) -> dict:
    return {"tensor_model_parallel_size": layout.tensor_model_parallel_size,
            "pipeline_model_parallel_size": layout.pipeline_model_parallel_size,
            "data_parallel_size": layout.data_parallel_size}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {**process_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    set_process_rng_state(state)
    get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank_objects(layout: ParallelLayout, loader_state: Optional[dict], rng: Optional[dict]) -> dict:
    from megatron.core.dist_checkpointing import ShardedObject

    model_parallel_replica = (layout.tp_rank, layout.pp_rank)
    return {
        "loader": ShardedObject("moca_loader_state", loader_state, (layout.data_parallel_size,),
                                (layout.dp_rank,), replica_id=model_parallel_replica),
        "rng": ShardedObject("moca_rng_state", rng, (layout.world_size,), (layout.rank,), replica_id=0),
    }


def save_training_checkpoint(cfg: PretrainConfig, layout: ParallelLayout, model, optimizer, scheduler,
                             iteration: int, loader_state: dict, consumed_tokens: float = 0.0) -> str:
    """Collective. Writes <save>/iter_XXXXXXX and then moves the tracker to it."""
    metadata = _optimizer_metadata(cfg)

    def training_state(model_state):
        return {"optimizer": optimizer.sharded_state_dict(model_state, metadata=metadata),
                **_per_rank_objects(layout, loader_state, _rng_state())}

    # the plain optimizer's state is keyed by parameter (reshards like the model); the distributed
    # optimizer's only in the fully reshardable layout
    reshardable = not cfg.parallel.use_distributed_optimizer or cfg.checkpoint.optim_fully_reshardable
    extra = {"iteration": iteration, "consumed_tokens": consumed_tokens, "layout": _layout_dict(layout),
             "data": data_identity(cfg),
             "scheduler": scheduler.state_dict(), "optimizer_metadata": metadata,
             "optimizer_reshardable": reshardable}
    strategy = fully_parallel_save_strategy() if cfg.checkpoint.fully_parallel else None
    return save_model(model, cfg.model, cfg.checkpoint.save, iteration, extra=extra,
                      training_state=training_state, content_metadata=metadata, sharded_strategy=strategy)


def _restore_step_counters(optimizer) -> None:
    """Without TE/apex, torch's AdamW keeps a `step` tensor per parameter (its bias correction).
    megatron's distributed optimizer saves the true count in the param groups, but restores the
    per-parameter tensors from the (primed) request rather than the checkpoint, and, where it does set
    them, as ONE tensor shared by every parameter (multi-tensor AdamW would then add 1 to it once per
    parameter). Each parameter gets its own counter with the saved count, as a run that never stopped has."""
    from megatron_moca.training.optimizer import inner_optimizers

    for opt in inner_optimizers(optimizer):
        for group in opt.param_groups:
            if "step" not in group:  # TE/apex fused Adam: the count lives in the group itself
                continue
            for p in group["params"]:
                state = opt.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and read_tracker(root) is not None


def load_training_checkpoint(cfg: PretrainConfig, layout: ParallelLayout, model, optimizer,
                             scheduler) -> Resumed:
    """Restore everything save_training_checkpoint wrote from <save>'s latest iteration."""
    from megatron.core import dist_checkpointing

    folder = resolve_checkpoint(cfg.checkpoint.save)
    meta = read_checkpoint_json(folder)
    if "iteration" not in meta:
        raise UserError(f"{folder}: a model checkpoint without training state (a converted model?); name it "
                        "with checkpoint.load and use a new checkpoint.save directory")
    saved_model = read_model_config(folder).to_dict()
    ours = cfg.model.to_dict()
    # kernels, precision and memory trade-offs, not the weights
    runtime_choices = ("attention_backend", "fp8", "fp8_recipe", "recompute_granularity", "recompute_num_layers")
    differ = sorted(k for k in ours if k not in runtime_choices and saved_model.get(k) != ours[k])
    if differ:
        raise UserError(f"checkpoint.save={cfg.checkpoint.save} holds a run of another model (model.{differ[0]} "
                        "differs): resume with that run's config.yaml, or name a new checkpoint.save")
    _check_same_data(cfg, folder, meta.get("data"))
    saved, now = meta["layout"], _layout_dict(layout)
    if saved["data_parallel_size"] != now["data_parallel_size"]:
        raise UserError(f"{folder} was saved with {saved['data_parallel_size']} data-parallel ranks, this run has "
                        f"{now['data_parallel_size']}: the data position is per rank; resume with the same "
                        "world size / TP / PP")
    same_model_layout = saved == now
    if not same_model_layout and not meta["optimizer_reshardable"]:
        raise UserError(f"{folder} was saved at TP={saved['tensor_model_parallel_size']} PP="
                        f"{saved['pipeline_model_parallel_size']} and this run is at TP="
                        f"{now['tensor_model_parallel_size']} PP={now['pipeline_model_parallel_size']}: its distributed "
                        "optimizer state reloads only at the saved layout; resume with it (runs that must change "
                        "layout: parallel.use_distributed_optimizer=false, or checkpoint.optim_fully_reshardable=true "
                        "with TE/apex)")
    prime_optimizer_state(optimizer)
    model_state = model.sharded_state_dict()
    request = {"model": model_state,
               "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True,
                                                         metadata=meta["optimizer_metadata"]),
               **_per_rank_objects(layout, None, None)}
    if not same_model_layout:  # RNG states belong to the saved ranks
        request.pop("rng")
    strategy = fully_parallel_load_strategy(folder) if cfg.checkpoint.fully_parallel else None
    loaded = dist_checkpointing.load(request, folder, sharded_strategy=strategy)
    model.load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 runs: the distributed optimizer's main params are views of the parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_step_counters(optimizer)
    scheduler.load_state_dict(meta["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    sources = len(loaded["loader"]["counts"])
    if sources != len(cfg.data.paths):
        raise UserError(f"{folder}: the run read {sources} data source(s), data.paths now names "
                        f"{len(cfg.data.paths)}: resume with the same data.paths")
    if dist.is_initialized():
        dist.barrier()
    return Resumed(int(meta["iteration"]), loaded["loader"], folder,
                   float(meta.get("consumed_tokens", 0.0)))  # 0 for checkpoints written before it was counted
