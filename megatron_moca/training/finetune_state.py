"""Stage-2 checkpoints and the release folder.

    <save>/iter_0000100/   replicated runs: an HF Qwen2.5-VL folder (legacy keys, fp32 master weights, config,
                           tokenizer files) + the AdamW state: optimizer.pt, or optimizer_rank<r>.pt (each
                           rank's ZeRO-1 shard); FSDP runs: a torch.distributed.checkpoint folder (.metadata
                           + one __<r>_0.distcp per rank: the encoder's weights and AdamW state, resharded on
                           load) - both with trainer_state.json + rng_rank<r>.pt (every rank's RNG)
    <save>/latest_checkpointed_iteration.txt   moved only after the iteration folder is complete
    <save>/release/        the final weights in the release dtype: what `moca eval` and users load

The batch order is a function of the iteration, so the iteration is the data position. A resume refuses a
changed model, data, batch or sharding mode. Replicated runs resume at their world size only (the ZeRO-1
shards and the RNG streams are per rank); FSDP runs at any: the global batches stay the same and in the
same order, each rank's slice of them follows the new world size, and only ranks that existed keep their
RNG streams (which matters only with dropout).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_moca.checkpointing import iteration_dir, write_tracker
from megatron_moca.errors import UserError
from megatron_moca.ownership import mark, publish, remove_ours
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


def lm_head_is_tied(model) -> bool:
    return model.lm_head.weight is model.get_input_embeddings().weight


def hf_tensors(model, dtype: Optional[torch.dtype] = None, tied: Optional[bool] = None
               ) -> Iterator[Tuple[str, torch.Tensor]]:
    """The model's weights under the legacy on-disk Qwen2.5-VL names, one at a time (a tied lm_head is not
    written; `tied` as the model was before FSDP replaced its parameters). FSDP-sharded weights are
    gathered here: collective, every rank must iterate."""
    from megatron_moca.conversion.mapping import normalize_hf_key
    from megatron_moca.training.fsdp import full_value

    tied = lm_head_is_tied(model) if tied is None else tied
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensor = full_value(tensor.detach())
        if dist.is_initialized() and dist.get_rank() != 0:
            continue  # gathered for rank 0, which writes
        yield normalize_hf_key(name), (tensor.to(dtype) if dtype is not None else tensor).cpu()


def write_hf_folder(model, base: str, folder: str, dtype: torch.dtype, embedding: Optional[dict] = None,
                    tied: Optional[bool] = None) -> None:
    """An HF folder of `model` in `dtype`: sharded safetensors + index, base's config.json with that
    torch_dtype, base's tokenizer / processor files, and `embedding` (min_pixels, max_pixels, max_length:
    what the run trained with) recorded for clients (hf_io.write_embedding_settings). Rank 0 writes; with
    FSDP every rank must call it (the weights are gathered one tensor at a time)."""
    from megatron_moca.conversion.convert import DTYPE_NAMES
    from megatron_moca.conversion.hf_config import declare_bidirectional
    from megatron_moca.conversion.hf_io import copy_side_files, read_config, write_embedding_settings, write_sharded

    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in hf_tensors(model, dtype, tied):  # take part in the gathers
            pass
        return
    write_sharded(hf_tensors(model, dtype, tied), folder)
    config = read_config(base)
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    if "dtype" in config:  # transformers >= 5 writes this name
        config["dtype"] = DTYPE_NAMES[dtype]
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("dtype", None)
        config["text_config"].pop("torch_dtype", None)
    declare_bidirectional(config)  # what the run trained: plain AutoModel is the embedder's encoder
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copy_side_files(base, folder)
    if embedding:
        write_embedding_settings(folder, **embedding)


def save_checkpoint(save: str, base: str, model, optimizer, iteration: int, identity: Dict[str, object],
                    embedding: Optional[dict] = None, encoder=None, consumed_tokens: float = 0.0) -> str:
    """Write iter_<iteration>/ (collective over the data-parallel ranks) and move the tracker to it.
    encoder: the FSDP-sharded PooledEncoder (None: a replicated run)."""
    rank = dist.get_rank()
    final = iteration_dir(save, iteration)
    staging = _staging(final)
    dist.barrier()
    torch.save(process_rng_state(), os.path.join(staging, f"rng_rank{rank}.pt"))
    if encoder is not None:
        _save_sharded(staging, encoder, optimizer)
    else:
        _save_replicated(staging, base, model, optimizer, embedding)
    if rank == 0:
        with open(os.path.join(staging, STATE_FILE), "w") as f:
            json.dump({"iteration": iteration, "world_size": dist.get_world_size(), "consumed_tokens": consumed_tokens,
                       **identity}, f, indent=2)
    dist.barrier()
    if rank == 0:
        publish(staging, final, "checkpoint.save")  # replaces a same-numbered folder of a run killed before its tracker moved
        write_tracker(save, iteration)
    dist.barrier()
    return final


def _staging(final: str) -> str:
    """`final`.partial, fresh and marked as ours (rank 0 makes it; a killed run's is cleared - only if ours)."""
    staging = final + ".partial"
    if dist.get_rank() == 0:
        remove_ours(staging)
        os.makedirs(staging)
        mark(staging, "moca finetune")
    return staging


def _save_replicated(staging: str, base: str, model, optimizer, embedding: Optional[dict]) -> None:
    sharded = hasattr(optimizer, "consolidate_state_dict")
    if sharded:
        torch.save(_local_optimizer(optimizer).state_dict(), _optimizer_file(staging, optimizer))
    if dist.get_rank() == 0:
        write_hf_folder(model, base, staging, torch.float32, embedding)
        if not sharded:
            torch.save(optimizer.state_dict(), _optimizer_file(staging, optimizer))


def _save_sharded(staging: str, encoder, optimizer) -> None:
    """torch.distributed.checkpoint of the encoder's weights and AdamW state: each rank writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(encoder, optimizer)
    dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=staging)


def _load_sharded(folder: str, encoder, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from megatron_moca.safe_load import audit_torch_dcp

    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise UserError(f"cannot resume {folder}: no .metadata (not a checkpoint of an FSDP run)")
    audit_torch_dcp(folder)  # torch unpickles .metadata and non-tensor items without restriction
    weights, optimizer_state = get_state_dict(encoder, optimizer)
    state = {"model": weights, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(encoder, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def check_resumable(folder: str, identity: Dict[str, object], reshardable: bool = False) -> dict:
    """The saved trainer state, after checking that the run would continue the same training.
    reshardable: the checkpoint may be resumed at another world size (FSDP)."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {STATE_FILE}; not a complete `moca finetune` checkpoint")
    state = load_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int):
        raise UserError(f"{path}: expected an object with the run's iteration and world_size")
    state.setdefault("fsdp", False)  # checkpoints written before FSDP existed
    for key, value in identity.items():
        if state.get(key) != value:
            raise UserError(f"cannot resume {folder}: {key} was {state.get(key)!r} and is now {value!r}; "
                            "start a new run directory (checkpoint.save) or restore the setting")
    if state["world_size"] != dist.get_world_size() and not reshardable:
        raise UserError(f"cannot resume {folder}: it ran on {state['world_size']} data-parallel ranks, this run has "
                        f"{dist.get_world_size()} (each rank's optimizer shard and RNG would differ; FSDP runs "
                        "reshard)")
    return state


def load_optimizer_and_rng(folder: str, optimizer, encoder=None) -> None:
    """Restore the AdamW state (and with FSDP the sharded weights) and this rank's RNG streams (where the
    saved run had this rank)."""
    if encoder is not None:
        _load_sharded(folder, encoder, optimizer)
    else:
        path = _optimizer_file(folder, optimizer)
        if not os.path.isfile(path):
            raise UserError(f"cannot resume {folder}: no {os.path.basename(path)} (was "
                            "parallel.use_distributed_optimizer changed? set it as the run had it)")
        _local_optimizer(optimizer).load_state_dict(load_weights_only(path))
    rng = os.path.join(folder, f"rng_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng) or encoder is None:  # replicated runs resume at their world size: every rank's is there
        set_process_rng_state(load_weights_only(rng))


def write_release(save: str, base: str, model, dtype: torch.dtype, embedding: Optional[dict] = None,
                  tied: Optional[bool] = None, training: Optional[dict] = None) -> str:
    """<save>/release/ (written by rank 0; collective with FSDP), replacing an older one only once the new
    one is complete; `training` (what the run did) goes into moca_training.json and the model card."""
    folder = os.path.join(save, RELEASE)
    staging = _staging(folder)
    write_hf_folder(model, base, staging, dtype, embedding, tied)
    if dist.get_rank() == 0:
        if training is not None:
            from megatron_moca.embed.model_card import write_model_card, write_training_record

            write_training_record(staging, training)
            write_model_card(staging)
        publish(staging, folder, "checkpoint.save")
    dist.barrier()
    return folder
