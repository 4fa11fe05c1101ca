"""Process-global adjustments of torch / megatron-core behaviour, each version-gated and applied once.

    tie_helpers_to_this_process()   megatron's checkpoint helper processes die with the process that made them

Why: a run killed with SIGKILL (OOM killer, scheduler preemption, `kill -9`) gets no chance to stop
its helpers. megatron-core's checkpoint writer forks one writer process per file bucket and keeps a
multiprocessing Manager server (its results queue) for the life of the job; both outlive a killed
parent - the Manager forever, the writers until their writes end. Here megatron's writer processes
ask the kernel for SIGKILL when their parent dies (prctl PR_SET_PDEATHSIG) before they write, and its
Manager is started with the same request. Spawned pool workers (the stage-1 loader) and torch's DataLoader workers
already exit when their parent's pipe closes, and multiprocessing's resource tracker when its last
client is gone.

(The CPU adaptation of megatron-core lives in distributed/cpu.py; issue 13 gathers the rest here.)
"""

from __future__ import annotations

import ctypes
import functools
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
    global _installed
    if _installed:
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
    _installed = True
