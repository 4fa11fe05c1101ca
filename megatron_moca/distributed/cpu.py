"""Every adaptation of megatron-core to a machine without CUDA, in one place.

megatron-core assumes CUDA in a few spots that no config flag avoids (see shared megatron-notes):
  * `torch.cuda.current_device()` for RoPE inv_freq, GlobalMemoryBuffer, TP mappings, p2p buffers;
  * literal `device="cuda"` tensors in the schedules, the optimizer and the default causal mask;
  * `torch.cuda.synchronize()` in dist-checkpoint save, `torch.cuda.current_stream()` in DDP;
  * the optimizers' dtype checks by CUDA type name (`param.type() == 'torch.cuda.FloatTensor'`);
  * the RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`), which
    stores CUDA generator states, and activation recompute, which saves and restores them.
`install()` neutralises them: a torch-function mode rewrites CUDA device arguments to the CPU (and
answers `Tensor.type()` with the CUDA type name),
`torch.cuda.current_device/synchronize/current_stream` become CPU-safe, and the RNG tracker is
replaced by one that keeps CPU generator states with the same names and seed offsets. It is
applied only when CUDA is unavailable and never touches a GPU process; `installed()` tells.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_MODE = None


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # an int device index means a CUDA ordinal in torch's API
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU; make `.cuda()` and `.to('cuda')` no-ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers check dtypes by CUDA type name ('torch.cuda.FloatTensor')
            return func(*args).replace("torch.", "torch.cuda.", 1)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Enough of torch.cuda.Stream for megatron's DDP and dist-checkpoint code paths."""

    def wait_stream(self, _other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's tracker with CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def manual_seed(seed: int, tp_rank: int) -> None:
    """CPU twin of megatron's `model_parallel_cuda_manual_seed` (same names and seed offsets)."""
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def install() -> None:
    """Apply the CPU adaptations (idempotent). Refuses to run where CUDA is available."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_moca.distributed.cpu.install() is for machines without CUDA")
    torch.cuda.current_device = lambda: 0  # an ordinal; the mode maps it to the CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    _install_rng_tracker()
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # activation recompute (tensor_parallel.checkpoint) saves "the CUDA RNG state" through this one
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # stays active for the life of the process


def installed() -> bool:
    return _MODE is not None
