"""Process groups (nccl on GPU, gloo on CPU), megatron parallel_state for TP/PP/DP, and seeding.

Works the same under torchrun (RANK/WORLD_SIZE/MASTER_* from the environment) and as a plain single
process (a local rendezvous on a free port).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_moca.errors import UserError


@dataclass
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_model_parallel_size - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 30


def init_process_group(megatron: bool = True, timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise torch.distributed if needed: from torchrun's env, else as a world of one.

    A world of one rendezvouses on a free loopback port without writing RANK/MASTER_* into the
    environment, so child processes (torchrun jobs, checkpoint writers) do not inherit them.
    megatron=False: a process that never runs megatron-core (stage 2, eval) skips its CPU adaptation
    (and the seconds of importing it). timeout_minutes bounds the start and every collective; with NCCL
    the communicator is bound to this rank's GPU at once (device_id), as Megatron-LM's initialize.py does.
    """
    if dist.is_initialized():
        return
    from megatron_moca.distributed.launch import check_launch

    check_launch()  # srun without torchrun would start N worlds of one: refused in one line
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    options = {"timeout": timedelta(minutes=timeout_minutes)}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        options["device_id"] = torch.device("cuda", local)
    elif megatron:
        from megatron_moca import compat

        compat.adapt_megatron_to_cpu()
    if "RANK" in os.environ:
        dist.init_process_group(backend, **options)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                **options)


def initialize(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               seed: int = 1234, timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> ParallelLayout:
    """Set up process groups + megatron parallel_state and seed every RNG; return the layout."""
    init_process_group(timeout_minutes=timeout_minutes)
    from megatron.core import parallel_state

    world = dist.get_world_size()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world % (tp * pp):
        raise UserError(f"world size {world} is not a multiple of tensor_model_parallel_size x "
                        f"pipeline_model_parallel_size = {tp} x {pp}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != tp
                or parallel_state.get_pipeline_model_parallel_world_size() != pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 distributed_timeout_minutes=timeout_minutes)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    seed_all(seed + 100 * parallel_state.get_pipeline_model_parallel_rank(), tp_rank)
    return current_layout()


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))


def seed_all(seed: int, tp_rank: int) -> None:
    """Seed python, numpy and torch, and megatron's model-parallel RNG tracker."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        from megatron_moca import compat

        compat.manual_seed(seed, tp_rank)


def shutdown() -> None:
    """Tear down megatron parallel state (where megatron was used) and the process group (tests, CLI exit)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
