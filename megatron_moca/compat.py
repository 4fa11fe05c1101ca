"""Every process-global adjustment of torch / megatron-core / warnings / loggers, in one module: each is
listed in PATCHES (what it changes, why, the versions it was written for), applied once, version-gated
where the target is a megatron-core internal, and recorded in `applied()`. tests/cpu/test_compat.py
checks every target exists in the installed versions and that no other module patches anything.

    quiet_import_warnings()          (package import) megatron-core's warnings about optional GPU packages
    quiet_megatron_logs()            (training CLI) megatron's INFO lines; GPTModel's deprecation line
    adapt_megatron_to_cpu()          (gloo runs) megatron-core's CUDA assumptions answered on the CPU
    route_megatron_rotary()          (model build) megatron attention's RoPE through models/rotary.py
    quiet_default_tp_group()         (torch.compile) the TP-group lookup without a warning per call
    raise_dynamo_cache_limit(n)      (torch.compile) room for varied sequence lengths
    tie_helpers_to_this_process()    (checkpoint save) megatron's writer processes die with this one

Nothing here runs at import time except what the package's __init__ calls (warnings filters only), and
nothing imports torch or megatron-core before a patch that needs them is applied.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

log = logging.getLogger("megatron_moca")

MEGATRON_TESTED = ((0, 16), (0, 19))
"""The megatron-core minor versions the internal patches were written and tested against (0.16.1, 0.19.2)."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str
    """What is replaced or filtered (module.attribute, or a logger / warning)."""
    why: str
    gated: bool = False
    """Applied only on the megatron-core versions of MEGATRON_TESTED (a private internal)."""


PATCHES: Tuple[Patch, ...] = (
    Patch("quiet_import_warnings", "warnings filter: 'Transformer Engine / Apex is not installed', 'full scope is "
          "deprecated'", "megatron-core warns at import about optional GPU packages; `moca env` reports them"),
    Patch("quiet_megatron_logs", "logging: 'megatron' at WARNING; a filter on megatron.core.models.gpt.gpt_model",
          "its INFO lists every bucket and option; 0.19 logs 'GPTModel IS DEPRECATED' on every construction"),
    Patch("adapt_megatron_to_cpu", "torch.cuda.current_device / synchronize / current_stream / default_stream / "
          "get_rng_state; megatron.core.tensor_parallel.random's RNG tracker and _get/_set_cuda_rng_state; a "
          "torch-function mode mapping CUDA devices to the CPU", "megatron-core assumes CUDA where no flag avoids it "
          "(see below); only on machines without CUDA"),
    Patch("route_megatron_rotary", "megatron.core.transformer.attention.apply_rotary_pos_emb",
          "the plain RoPE case in 4 kernels, cos/sin once per forward, bit-identical (models/rotary.py)", gated=True),
    Patch("quiet_default_tp_group", "megatron.core.tensor_parallel.layers.get_tensor_model_parallel_group_if_none",
          "a DeprecationWarning per call splits every compiled block into several graphs", gated=True),
    Patch("raise_dynamo_cache_limit", "torch._dynamo.config.cache_size_limit",
          "varied sequence lengths would exceed the default 8 entries and fall back to eager"),
    Patch("tie_helpers_to_this_process", "megatron.core.dist_checkpointing.strategies.filesystem_async."
          "FileSystemWriterAsync.write_preloaded_data and _get_write_results_queue",
          "megatron's checkpoint writers and Manager server outlive a killed run (guarded by hasattr)"),
)

_applied: set = set()


def applied() -> List[str]:
    """The patches applied in this process, in PATCHES order."""
    return [p.name for p in PATCHES if p.name in _applied]


def megatron_version() -> Optional[Tuple[int, int]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in version("megatron-core").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


def _gate(name: str) -> bool:
    """Whether a gated patch may be applied (an untested megatron-core keeps its own code, with a warning)."""
    ours = megatron_version()
    if ours is not None and MEGATRON_TESTED[0] <= ours <= MEGATRON_TESTED[1]:
        return True
    log.warning("megatron-core %s is outside the tested %s..%s: %s is not applied", ours, MEGATRON_TESTED[0],
                MEGATRON_TESTED[1], name)
    return False


def _once(name: str) -> bool:
    """True the first time `name` is applied (then recorded)."""
    if name in _applied:
        return False
    _applied.add(name)
    return True


# ---- warnings and logs ---------------------------------------------------------------------------------

def quiet_import_warnings() -> None:
    if not _once("quiet_import_warnings"):
        return
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated.*")


def quiet_megatron_logs() -> None:
    if not _once("quiet_megatron_logs"):
        return
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(
        lambda record: "GPTModel IS DEPRECATED" not in record.getMessage())


# ---- megatron-core on a machine without CUDA -------------------------------------------------------------
# megatron-core assumes CUDA in a few spots that no config flag avoids (see shared megatron-notes):
#   * `torch.cuda.current_device()` for RoPE inv_freq, GlobalMemoryBuffer, TP mappings, p2p buffers;
#   * literal `device="cuda"` tensors in the schedules, the optimizer and the default causal mask;
#   * `torch.cuda.synchronize()` in dist-checkpoint save, `torch.cuda.current_stream()` in DDP;
#   * the optimizers' dtype checks by CUDA type name (`param.type() == 'torch.cuda.FloatTensor'`);
#   * the RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`), which stores
#     CUDA generator states, and activation recompute, which saves and restores them.
# A torch-function mode rewrites CUDA device arguments to the CPU (and answers `Tensor.type()` with the
# CUDA type name), the torch.cuda calls become CPU-safe, and the RNG tracker keeps CPU generator states
# with the same names and seed offsets. Never applied where CUDA is available.

_MODE = None


def _is_cuda_device(dev) -> bool:
    import torch

    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # an int device index means a CUDA ordinal in torch's API
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cuda_to_cpu_mode():
    """A torch-function mode that rewrites CUDA device arguments to CPU and makes `.cuda()` and
    `.to('cuda')` no-ops (made here: torch is imported only when it is needed)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToCpu(TorchFunctionMode):
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

    return CudaToCpu()


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
    import torch
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
    import torch
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def adapt_megatron_to_cpu() -> None:
    """Apply the CPU adaptations (idempotent). Refuses to run where CUDA is available."""
    import torch

    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_moca.compat.adapt_megatron_to_cpu() is for machines without CUDA")
    _once("adapt_megatron_to_cpu")
    ours = megatron_version()
    if ours is not None and not MEGATRON_TESTED[0] <= ours <= MEGATRON_TESTED[1]:
        log.warning("megatron-core %s is outside the tested %s..%s: its CPU adaptation may be incomplete", ours,
                    MEGATRON_TESTED[0], MEGATRON_TESTED[1])
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
    _MODE = _cuda_to_cpu_mode()
    _MODE.__enter__()  # stays active for the life of the process


def cpu_adapted() -> bool:
    return _MODE is not None


# ---- megatron-core attention's rotary ---------------------------------------------------------------------

class _CosSinOfLastFreqs:
    """cos/sin of the angle tensor most recently seen: every layer of a forward gets the same one."""

    def __init__(self):
        self.freqs, self.dtype, self.version, self.value = None, None, None, None

    def __call__(self, freqs, dtype):
        if freqs is not self.freqs or dtype != self.dtype or self.version != freqs._version:
            half = freqs[..., : freqs.shape[-1] // 2]
            self.freqs, self.dtype, self.version = freqs, dtype, freqs._version
            self.value = (half.cos().to(dtype), half.sin().to(dtype))  # rope_utils' cast
        return self.value


def _plain_megatron_rope(t, freqs, config, cu_seqlens, mscale) -> bool:
    """The case rope_utils handles with `_apply_rotary_pos_emb_bshd` on angles cat(f, f): [s, b, h, d] tokens,
    or a THD pack [t, h, d] whose angles are given per token ([t, 1, 1, d]: the M-RoPE positions of packed
    documents, which restart per document), where megatron maps angle row i to token i as well."""
    per_token_thd = cu_seqlens is not None and t.dim() == 3 and freqs.shape[0] == t.shape[0]
    return ((cu_seqlens is None or per_token_thd) and mscale == 1.0 and not config.apply_rope_fusion
            and not config.rotary_interleaved and not getattr(config, "multi_latent_attention", False)
            and freqs.shape[-1] == t.shape[-1] and not freqs.requires_grad
            and getattr(config, "context_parallel_size", 1) == 1)


def route_megatron_rotary() -> None:
    """Route megatron-core's attention rotary (transformer/attention.py's `apply_rotary_pos_emb`) through
    models.rotary.half_rotary for the plain case; everything else (THD cu_seqlens, fused TE rope, YaRN
    mscale, interleaved or partial rotary, MLA, torch.compile tracing) keeps megatron's function."""
    if "route_megatron_rotary" in _applied or not _gate("route_megatron_rotary"):
        return
    _once("route_megatron_rotary")
    import torch
    from megatron.core.transformer import attention

    from megatron_moca.models import rotary

    original = attention.apply_rotary_pos_emb
    cos_sin = _CosSinOfLastFreqs()

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None, **kwargs):
        if kwargs or torch.compiler.is_compiling() or not _plain_megatron_rope(t, freqs, config, cu_seqlens, mscale):
            return original(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group,
                            **kwargs)
        cos, sin = cos_sin(freqs, t.dtype)
        if cu_seqlens is not None:  # THD [t, h, d] with per-token angles [t, 1, 1, d]
            return rotary.half_rotary(t.unsqueeze(1), cos, sin).squeeze(1)
        return rotary.half_rotary(t, cos, sin)

    apply_rotary_pos_emb._moca_half_rotary = True
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb


# ---- torch.compile -----------------------------------------------------------------------------------------

def quiet_default_tp_group() -> None:
    """megatron-core 0.16-0.19: RowParallelLinear calls its matmul helper with tp_group=None, which then
    resolves the default group through `get_tensor_model_parallel_group_if_none`, issuing a
    DeprecationWarning on every call. Dynamo cannot trace `warnings.warn`, so every row-parallel linear
    split each compiled block into several graphs (more guards run on the host per step). Same
    resolution, without the warning, in the one module that looks it up."""
    if "quiet_default_tp_group" in _applied or not _gate("quiet_default_tp_group"):
        return
    _once("quiet_default_tp_group")
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    original = layers.get_tensor_model_parallel_group_if_none

    def quiet(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and torch.distributed.is_initialized() and parallel_state.is_initialized():
            if is_expert:
                return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
            return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    quiet._moca_quiet = True
    layers.get_tensor_model_parallel_group_if_none = quiet


def raise_dynamo_cache_limit(entries: int) -> None:
    """Different sequence lengths and block kinds each add a dynamo cache entry; the default limit (8) would
    silently fall back to eager on a long run with varied lengths."""
    import torch._dynamo

    _applied.add("raise_dynamo_cache_limit")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, entries)


# ---- megatron's checkpoint helper processes ------------------------------------------------------------
# A run killed with SIGKILL (OOM killer, scheduler preemption, `kill -9`) gets no chance to stop its
# helpers. megatron-core's checkpoint writer forks one writer process per file bucket and keeps a
# multiprocessing Manager server (its results queue) for the life of the job; both outlive a killed
# parent - the Manager forever, the writers until their writes end. Here megatron's writer processes ask
# the kernel for SIGKILL when their parent dies (prctl PR_SET_PDEATHSIG) before they write, and its
# Manager is started with the same request. Spawned pool workers (the stage-1 loader) and torch's
# DataLoader workers already exit when their parent's pipe closes, and multiprocessing's resource tracker
# when its last client is gone.

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: ask for SIGKILL when the parent exits (Linux); exit at once if it is gone."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os._exit(1)


def _megatron_results_queue():
    """megatron's checkpoint-writer results queue, on a Manager server that dies with this process."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        filesystem_async._moca_manager = manager  # keep it referenced for the life of the process
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue


def _dying_with_parent(write):
    """megatron's per-bucket writer (the function its forked writer processes run), asking first to die
    with the process that forked it."""

    @functools.wraps(write)
    def writer(*args, **kwargs):
        die_with_parent()
        return write(*args, **kwargs)

    return writer


def tie_helpers_to_this_process() -> None:
    """megatron's forked checkpoint writers and its checkpoint Manager server die with this process.
    Idempotent; call before the first checkpoint save. Only megatron's own helpers are touched: a
    process-wide at-fork hook would also bind the children other libraries fork from short-lived
    threads (torch.compile's workers) to those threads, which kills them early."""
    if "tie_helpers_to_this_process" in _applied:
        return
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # megatron-core not installed: nothing of it to adjust
        filesystem_async = None
    # megatron-core 0.16 - 0.19: the writer processes run FileSystemWriterAsync.write_preloaded_data (a
    # staticmethod, looked up when each save forks), the queue lives in _results_queue, made by
    # _get_write_results_queue
    writer_class = getattr(filesystem_async, "FileSystemWriterAsync", None)
    if writer_class is not None and hasattr(writer_class, "write_preloaded_data"):
        writer_class.write_preloaded_data = staticmethod(_dying_with_parent(writer_class.write_preloaded_data))
    if filesystem_async is not None and hasattr(filesystem_async, "_get_write_results_queue") \
            and hasattr(filesystem_async, "_results_queue"):
        filesystem_async._get_write_results_queue = _megatron_results_queue
    _applied.add("tie_helpers_to_this_process")
