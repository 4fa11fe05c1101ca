"""How a rank process relates to whatever launched it: torchrun's agent, Slurm, a shell.

    bind_to_launcher()            under torchrun: this rank gets SIGKILL when the agent dies (kill -9 of a
                                  job's process group must leave no rank training and writing)
    init_loader_worker()          in data-loader workers: SIGTERM / SIGUSR1 are the trainer's to handle
                                  (training/preemption.py saves at the next step boundary), and the
                                  worker dies with its parent
"""

from __future__ import annotations

import os
import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def under_torchrun() -> bool:
    """Whether torch's elastic agent (torchrun) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def bind_to_launcher() -> None:
    """Under torchrun, ask the kernel to SIGKILL this rank when its parent (the agent) dies. torchrun starts
    every rank in a session of its own, so a signal to the job's process group never reaches them; without
    this, kill -9 of torchrun leaves ranks training and writing next to the rerun."""
    if under_torchrun():
        from megatron_moca.compat import die_with_parent

        die_with_parent()


def init_loader_worker(*_args) -> None:
    """A data-loader worker's initialiser. SIGTERM / SIGUSR1 are ignored: Slurm signals every process of a job
    step, and a worker that died of it mid-batch would fail its parent's next fetch before the parent could
    save. And the worker dies with its parent at once (torch's DataLoader workers otherwise notice a dead
    parent only at their next 5-second status check)."""
    from megatron_moca.compat import die_with_parent

    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
