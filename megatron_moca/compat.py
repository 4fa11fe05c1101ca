"""Process-global adjustments of torch / megatron-core behaviour, each version-gated and applied once.

    tie_helpers_to_this_process()   helper processes die with the process that made them

Why: a run killed with SIGKILL (OOM killer, scheduler preemption, `kill -9`) gets no chance to stop
its helpers. megatron-core's checkpoint writer forks one writer process per file bucket and keeps a
multiprocessing Manager server (its results queue) for the life of the job; both outlive a killed
parent - the Manager forever, the writers until their writes end. Here every process this one forks
asks the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), and megatron's Manager is
started with the same request. Spawned pool workers (the stage-1 loader) and torch's DataLoader workers
already exit when their parent's pipe closes, and multiprocessing's resource tracker when its last
client is gone.

(The CPU adaptation of megatron-core lives in distributed/cpu.py; issue 13 gathers the rest here.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_installed = False


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


def tie_helpers_to_this_process() -> None:
    """Forked children of this process (megatron's checkpoint writers among them) and megatron's
    checkpoint Manager server die with it. Idempotent; call before the first checkpoint save."""
    global _installed
    if _installed:
        return
    os.register_at_fork(after_in_child=die_with_parent)
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # megatron-core not installed: nothing of it to adjust
        filesystem_async = None
    # megatron-core 0.16 - 0.19 keep the queue in this module global, made by _get_write_results_queue
    if filesystem_async is not None and hasattr(filesystem_async, "_get_write_results_queue") \
            and hasattr(filesystem_async, "_results_queue"):
        filesystem_async._get_write_results_queue = _megatron_results_queue
    _installed = True
