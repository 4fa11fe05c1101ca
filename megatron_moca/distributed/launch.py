"""How a rank process relates to whatever launched it: torchrun's agent, Slurm, a shell.

    bind_to_launcher()            under torchrun: this rank gets SIGKILL when the agent dies (kill -9 of a
                                  job's process group must leave no rank training and writing)
    init_loader_worker()          in data-loader workers: SIGTERM / SIGUSR1 are the trainer's to handle
                                  (training/preemption.py saves at the next step boundary), and the
                                  worker dies with its parent
    check_launch()                a multi-task srun step without torchrun is refused in one line (each task
                                  would be a world of one)
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
    save. The worker dies with its parent at once (torch's DataLoader workers otherwise notice a dead
    parent only at their next 5-second status check), and computes on one thread."""
    from megatron_moca.compat import die_with_parent

    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
    # one thread each: a rank's OMP_NUM_THREADS multiplied by its workers would oversubscribe the node
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def check_launch() -> None:
    """Refuse (one line) a multi-task Slurm step that did not go through torchrun: without RANK / WORLD_SIZE
    every task would start a world of one on the same GPU and write the same run directory. (Megatron-LM
    expects torchrun too; mapping SLURM_PROCID would also need the head node's address, which the sbatch's
    torchrun rendezvous already provides.)"""
    from megatron_moca.errors import UserError

    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or ""
    if "RANK" not in os.environ and tasks.isdigit() and int(tasks) > 1:
        raise UserError(f"started by srun as task {os.environ.get('SLURM_PROCID', '?')} of {tasks} without torchrun: "
                        "every task would train alone as a world of one on the same GPU; run one torchrun per node "
                        "(examples/slurm.sbatch), or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
