"""Preemption: SIGTERM (Slurm's preemption and `scancel`, torchrun forwarding its own) or SIGUSR1 (Slurm's
`--signal=USR1@SECONDS` before the time limit) makes the run save a checkpoint at the next step boundary and
stop, so the rerun of the same command resumes exactly where it stopped.

The handler only records the signal; the loop asks `requested()` after every step, and with several ranks
the answer is agreed on by an all-reduce (MAX) - a signal may reach some ranks first, and every rank must
take the same branch, since the save is collective. After Megatron-LM's dist_signal_handler.py (an
all-gather of each rank's flag every iteration); one int64 all-reduce per step costs microseconds.

Loader worker processes ignore both signals (distributed/launch.py): Slurm signals every process of the
job step, and a worker killed mid-batch would fail its parent's next fetch; they end when their parent does.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from megatron_moca.distributed.launch import PREEMPTION_SIGNALS as SIGNALS
from megatron_moca.errors import Stopped


class Preempted(Stopped):
    """The run stopped after saving, on a signal; it exits as the signal would have ended it (128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + signum)


class PreemptionWatch:
    """Records SIGTERM / SIGUSR1 while installed (a context manager; the previous handlers come back after)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self, device: torch.device) -> Optional[int]:
        """The signal any rank received (collective when there are several ranks), or None."""
        flag = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([flag], dtype=torch.int64, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flag = int(value.item())
        return flag or None
