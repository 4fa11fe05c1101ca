"""Stage-2 checkpoints and the release folder.

    <save>/iter_0000100/   an HF Qwen2.5-VL folder (legacy keys, fp32 master weights, config, tokenizer
                           files) + trainer_state.json + rng_rank<r>.pt (every rank's RNG) + the AdamW
                           state: optimizer.pt, or optimizer_rank<r>.pt (each rank's shard) when sharded
    <save>/latest_checkpointed_iteration.txt   moved only after the iteration folder is complete
    <save>/release/        the final weights in the release dtype: what `moca eval` and users load

Weights are replicated over data-parallel ranks: rank 0 writes them (and a replicated optimizer); the
batch order is a function of the iteration, so the iteration is the data position. A resume reloads the
weights from the iter folder with transformers (exact fp32) and refuses a changed model, data or batch.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_moca.checkpointing import iteration_dir, write_tracker
from megatron_moca.errors import UserError
from megatron_moca.safe_load import load_json, load_weights_only
from megatron_moca.training.rng import process_rng_state, set_process_rng_state

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RELEASE = "release"


def _optimizer_file(folder: str, optimizer) -> str:
    """Where this rank's optimizer state goes: a sharded (ZeRO) optimizer's local part is per rank."""
    if hasattr(optimizer, "consolidate_state_dict"):
        return os.path.join(folder, f"optimizer_rank{dist.get_rank()}.pt")
    return os.path.join(folder, OPTIMIZER_FILE)


def _local_optimizer(optimizer):
    return getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps the rank's AdamW


def hf_tensors(model, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """The model's weights under the legacy on-disk Qwen2.5-VL names (a tied lm_head is not written)."""
    from megatron_moca.conversion.mapping import normalize_hf_key

    tied = model.lm_head.weight is model.get_input_embeddings().weight
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        yield normalize_hf_key(name), tensor.to(dtype) if dtype is not None else tensor


def write_hf_folder(model, base: str, folder: str, dtype: torch.dtype, embedding: Optional[dict] = None) -> None:
    """An HF folder of `model` in `dtype`: sharded safetensors + index, base's config.json with that
    torch_dtype, base's tokenizer / processor files, and `embedding` (min_pixels, max_pixels, max_length:
    what the run trained with) recorded for clients (hf_io.write_embedding_settings)."""
    from megatron_moca.conversion.convert import DTYPE_NAMES
    from megatron_moca.conversion.hf_io import copy_side_files, read_config, write_embedding_settings, write_sharded

    write_sharded(hf_tensors(model, dtype), folder)
    config = read_config(base)
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    if "dtype" in config:  # transformers >= 5 writes this name
        config["dtype"] = DTYPE_NAMES[dtype]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_side_files(base, folder)
    if embedding:
        write_embedding_settings(folder, **embedding)


def save_checkpoint(save: str, base: str, model, optimizer, iteration: int, identity: Dict[str, object],
                    embedding: Optional[dict] = None) -> str:
    """Write iter_<iteration>/ (collective over the data-parallel ranks) and move the tracker to it."""
    rank = dist.get_rank()
    final = iteration_dir(save, iteration)
    staging = final + ".partial"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    torch.save(process_rng_state(), os.path.join(staging, f"rng_rank{rank}.pt"))
    sharded = hasattr(optimizer, "consolidate_state_dict")
    if sharded:
        torch.save(_local_optimizer(optimizer).state_dict(), _optimizer_file(staging, optimizer))
    if rank == 0:
        write_hf_folder(model, base, staging, torch.float32, embedding)
        if not sharded:
            torch.save(optimizer.state_dict(), _optimizer_file(staging, optimizer))
        with open(os.path.join(staging, STATE_FILE), "w") as f:
            json.dump({"iteration": iteration, "world_size": dist.get_world_size(), **identity}, f, indent=2)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # a same-numbered folder of a run killed before its tracker moved
        os.replace(staging, final)
        write_tracker(save, iteration)
    dist.barrier()
    return final


def check_resumable(folder: str, identity: Dict[str, object]) -> dict:
    """The saved trainer state, after checking that the run would continue the same training."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {STATE_FILE}; not a complete `moca finetune` checkpoint")
    state = load_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int):
        raise UserError(f"{path}: expected an object with the run's iteration and world_size")
    for key, value in identity.items():
        if state.get(key) != value:
            raise UserError(f"cannot resume {folder}: {key} was {state.get(key)!r} and is now {value!r}; "
                            "start a new run directory (checkpoint.save) or restore the setting")
    if state["world_size"] != dist.get_world_size():
        raise UserError(f"cannot resume {folder}: it ran on {state['world_size']} data-parallel ranks, this run has "
                        f"{dist.get_world_size()} (each rank's batch slice and RNG would differ)")
    return state


def load_optimizer_and_rng(folder: str, optimizer) -> None:
    path = _optimizer_file(folder, optimizer)
    if not os.path.isfile(path):
        raise UserError(f"cannot resume {folder}: no {os.path.basename(path)} (was parallel.use_distributed_optimizer "
                        "changed? set it as the run had it)")
    _local_optimizer(optimizer).load_state_dict(load_weights_only(path))
    set_process_rng_state(load_weights_only(os.path.join(folder, f"rng_rank{dist.get_rank()}.pt")))


def write_release(save: str, base: str, model, dtype: torch.dtype, embedding: Optional[dict] = None) -> str:
    """<save>/release/ (rank 0), replacing an older one only once the new one is complete."""
    folder = os.path.join(save, RELEASE)
    if dist.get_rank() == 0:
        staging = folder + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        write_hf_folder(model, base, staging, dtype, embedding)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    dist.barrier()
    return folder
