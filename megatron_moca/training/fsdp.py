"""Stage 2 sharded with torch FSDP2 (`parallel.fsdp`): parameters, gradients and AdamW state split over the
data-parallel ranks, or HSDP (`parallel.fsdp_shard_size`): split within groups, replicated across them.

    checkpoint    with model.gradient_checkpointing, each vision block and decoder layer is wrapped in torch's
                  checkpoint_wrapper BEFORE fully_shard (torchtitan's order: activation_checkpoint.py, then
                  fsdp.py), so FSDP's hooks wrap the checkpoint instead of being replayed inside it (HF's own
                  checkpointing re-enters them during the recompute; torch < 2.13 then skips the bf16 cast and
                  the re-unshard there - NeMo Automodel PR #3513)
    fully_shard   each vision block, the vision tower (patch embedding + merger), each decoder layer, and
                  the PooledEncoder root (embeddings, final norm); bf16 parameters for compute where
                  model.compute_dtype is bfloat16, fp32 master weights and fp32 gradient reduction; the vision
                  blocks keep their inputs as given (cast_forward_inputs=False): their rotary cos/sin stay
                  fp32, as on the replicated path and in the embedder (FSDP would round them to bf16)
    gradients     FSDP reduce-scatters the gradients in the backward; under GradCache only the last chunk's
                  backward does (deferred_gradient_sync: the chunks before accumulate unsharded gradients, in
                  the compute dtype), so a step reduces once - one inter-node all-reduce on HSDP, not one per
                  chunk; the divide factor makes the result the sum or the mean over ranks
                  (parallel.gradient_reduction)
    norms         clip_grad_norm_ over DTensor gradients: torch reduces the shards' norms
    loading       rank 0 reads the HF folder (one fp32 copy in host memory); the other ranks build the
                  model on the meta device (no memory), and after sharding each rank receives its shards
                  from rank 0 (set_model_state_dict, broadcast_from_rank0), buffers too

After torchtitan's torchtitan/models/llama3/infra/parallelize.py (apply_fsdp), written for the HF
Qwen2.5-VL modules.
"""

from __future__ import annotations

import contextlib
from typing import List

import torch
import torch.distributed as dist


def device_mesh(device: torch.device, shard_size: int = None):
    """A 1-D mesh over all ranks, or a 2-D (replicate, shard) mesh for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if shard_size in (None, world):
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def sharded_modules(backbone: torch.nn.Module) -> List[torch.nn.Module]:
    """The units FSDP gathers one at a time, innermost first: vision blocks, the vision tower, decoder layers."""
    return [*backbone.visual.blocks, backbone.visual, *backbone.language_model.layers]


def checkpoint_units(backbone: torch.nn.Module) -> None:
    """Wrap every vision block and decoder layer in torch's non-reentrant checkpoint_wrapper, in place (state
    dict names unchanged: the wrapper strips its own prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for blocks in (backbone.visual.blocks, backbone.language_model.layers):
        for i, unit in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(unit, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def shard(encoder: torch.nn.Module, device: torch.device, compute_dtype: str, shard_size: int = None,
          gradient_reduction: str = "sum", checkpointing: bool = False) -> None:
    """fully_shard the PooledEncoder in place (its parameters become DTensors on `device`); checkpointing:
    activation checkpointing per vision block and decoder layer, applied first."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if checkpointing:
        checkpoint_units(encoder.backbone)
    mesh = device_mesh(device, shard_size)
    param_dtype = torch.bfloat16 if compute_dtype == "bfloat16" else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    as_given = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    blocks = {id(b) for b in encoder.backbone.visual.blocks}
    for module in sharded_modules(encoder.backbone):
        fully_shard(module, mesh=mesh, mp_policy=as_given if id(module) in blocks else policy)
    fully_shard(encoder, mesh=mesh, mp_policy=policy)
    factor = 1.0 if gradient_reduction == "sum" else float(dist.get_world_size())
    for module in encoder.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(factor)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM + a scale: gloo has no PREMUL_SUM


@contextlib.contextmanager
def deferred_gradient_sync(encoder: torch.nn.Module):
    """GradCache's chunks before the last: FSDP keeps their gradients unsharded and accumulates them (no
    reduce-scatter, no HSDP all-reduce); the last chunk's backward reduces the sum once. After torchtitan's
    set_requires_gradient_sync around repeated backward calls (components/loss.py)."""
    encoder.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        encoder.set_requires_gradient_sync(True)


def meta_model(folder: str):
    """The HF model of `folder`'s config.json on the meta device (shapes only; no weights read)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                               dtype=torch.float32)


def load_from_rank0(encoder: torch.nn.Module, full_state: dict, device: torch.device) -> None:
    """After shard(): ranks other than 0 (built on the meta device) get storage, then every rank takes its
    shards of rank 0's full state dict (collective; full_state is {} off rank 0) and rank 0's buffers
    (the rotary inv_freq buffers are not in the state dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        encoder.to_empty(device=device)
    set_model_state_dict(encoder, full_state, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in encoder.buffers():
            dist.broadcast(buffer, src=0)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (collective: every rank calls it), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
