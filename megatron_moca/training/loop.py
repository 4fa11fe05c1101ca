"""The training loop of both stages: everything around one optimizer step lives here once.

    prologue   the run directory and its resolved config.yaml, written only after the stage accepted
               (or refused) the resume - a refused resume leaves the directory as it was
    step       stage.forward_backward (the global batch's loss, parts, tokens, FLOPs; stage 2 also its
               gradient norm) -> the non-finite guard, BEFORE the update is applied -> stage.apply_update
    record     the throughput window, one metrics.jsonl record + log line per log_interval (rank 0)
    cadence    saves (every save_interval, at the end, where exit_interval stops the run), early stops
    epilogue   stage.finish (stage 2: the release), the metrics writer closed on every exit

A stage (training/pretrain.py: megatron-core; training/finetune.py: transformers, replicated or FSDP2)
supplies its step, its update, its extra metrics and its checkpoint. After torchtitan's trainer.py
(one train loop, model-specific pieces behind it) and Megatron-LM's training.py (cadence flags).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol

import torch.distributed as dist

from megatron_moca.errors import UserError
from megatron_moca.training.cadence import Cadence

log = logging.getLogger("megatron_moca.train")

CONFIG_FILE = "config.yaml"


class TrainingError(UserError):
    """The run cannot go on (e.g. a non-finite loss); the last checkpoint is intact."""


class NonFiniteStep(Exception):
    """Raised by a stage's forward_backward that found a non-finite value itself (e.g. megatron's gradient
    check); the loop turns it into the run's one-line stop."""

    def __init__(self, what: str, value):
        super().__init__(f"non-finite {what}")
        self.what, self.value = what, value


@dataclass
class StepOutput:
    """What one global batch gave, before the update."""

    loss: float
    """The global batch's objective (the non-finite guard checks it)."""
    lr: float
    """The learning rate this step's update uses."""
    tokens: float
    """Tokens of the global batch (all ranks)."""
    flops: float
    """Model FLOPs of the global batch (all ranks)."""
    data_seconds: float = 0.0
    """Time spent waiting for the batch."""
    parts: Dict[str, float] = field(default_factory=dict)
    """The loss's parts and other per-step numbers for the record (mlm_loss, accuracy, ...)."""
    grad_norm: Optional[float] = None
    """Known before the update (stage 2 clips first); None where the update computes it (megatron)."""


class Stage(Protocol):
    def forward_backward(self, iteration: int) -> StepOutput:
        """Forward + backward of the batch of `iteration` (0-based); gradients reduced, nothing applied."""

    def apply_update(self) -> Optional[float]:
        """Apply the optimizer step; returns the gradient norm where the update computed it."""

    def extra_metrics(self) -> Dict[str, object]:
        """More numbers for a logged record (collective: every rank calls it on log steps)."""

    def save(self, iteration: int, consumed_tokens: float) -> None:
        """Write the checkpoint of `iteration` (collective) and move the tracker to it; consumed_tokens (all
        ranks' tokens so far) goes with it."""

    def finish(self, iteration: int, consumed_tokens: float) -> None:
        """After the last step of this invocation (collective)."""


@dataclass
class LoopSettings:
    """What the loop needs from a stage's config."""

    save: str
    train_iters: int
    log_interval: int
    save_interval: int
    exit_interval: Optional[int]
    world_size: int
    tensorboard_dir: Optional[str] = None
    peak_tflops: Optional[float] = None
    wandb: Optional[dict] = None
    """{"project", "name", "config"} of the W&B run to mirror the records to (None: none)."""
    device: str = "cpu"
    """This rank's device (the preemption flag's all-reduce runs there: NCCL needs a GPU tensor)."""

    @classmethod
    def of(cls, cfg, train_iters: int, world_size: int, device="cpu") -> "LoopSettings":
        from megatron_moca.config.loading import to_dict

        log_cfg = cfg.logging
        wandb = ({"project": log_cfg.wandb_project, "name": log_cfg.wandb_run_name, "config": to_dict(cfg)}
                 if log_cfg.wandb_project else None)
        return cls(cfg.checkpoint.save, train_iters, log_cfg.log_interval, cfg.checkpoint.save_interval,
                   cfg.train.exit_interval, world_size, log_cfg.tensorboard_dir, log_cfg.peak_tflops, wandb,
                   str(device))


def write_resolved_config(cfg) -> None:
    """<save>/config.yaml: the run's config as resolved (file + overrides + defaults), replaced atomically."""
    import yaml

    from megatron_moca.config.loading import to_dict

    path = os.path.join(cfg.checkpoint.save, CONFIG_FILE)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(e, cfg.checkpoint.save):
            raise TrainingError(f"{path}: no space left on device; free space under {cfg.checkpoint.save} and rerun "
                                "the same command") from None
        raise


def disk_full(error: BaseException, folder: str) -> bool:
    """Whether a failed write was the disk (or quota) running out: ENOSPC / EDQUOT anywhere in the error's
    chain, or - megatron's writers report it as their own error, e.g. 'unexpected pos 704 vs 598' - less than
    LOW_SPACE left under `folder` now."""
    import errno
    import shutil

    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


LOW_SPACE = 64 * 2**20
"""Free bytes under which a failed checkpoint write is reported as a full disk."""


def earlier_run(folder: str) -> bool:
    """A run directory written before run directories were marked (ownership.py): it has a tracker, or the
    config and metrics of a run."""
    from megatron_moca.checkpointing import TRACKER

    return os.path.isfile(os.path.join(folder, TRACKER)) or all(
        os.path.isfile(os.path.join(folder, name)) for name in (CONFIG_FILE, "metrics.jsonl"))


def claim_run_directory(save: str, command: str, create: bool = True) -> None:
    """checkpoint.save as this run's directory: new, empty, or a run directory of ours; a folder of anything
    else is refused in one line (create=False: only checked, nothing written)."""
    from megatron_moca.ownership import claim

    claim(save, command, "checkpoint.save", legacy=earlier_run, create=create)


def open_run_directory(cfg, resumed_from: Optional[str], iteration: int, command: str) -> None:
    """The prologue, once the stage has built (or refused) its resume: rank 0 claims the run directory and
    writes config.yaml."""
    if dist.get_rank() != 0:
        return
    if resumed_from:
        log.info("resumed from %s at iteration %d", resumed_from, iteration)
    claim_run_directory(cfg.checkpoint.save, command)
    write_resolved_config(cfg)


def diverged(iteration: int, what: str, value, save: str, last_saved: int, applied: bool = False) -> TrainingError:
    """The one-line stop of a run whose step went non-finite; the last checkpoint was written before it."""
    from megatron_moca.checkpointing import iteration_dir

    last = (f"the last good checkpoint is {iteration_dir(save, last_saved)}" if last_saved
            else "no checkpoint was written yet")
    when = "after applying it" if applied else "before applying it"
    return TrainingError(f"non-finite {what} ({value}) at iteration {iteration}: the run stopped {when}; "
                         f"{last} - lower optim.lr or check the data")


def _save(stage: Stage, iteration: int, consumed_tokens: float, save: str, last_saved: int) -> None:
    """stage.save, with a full disk reported in one line (the tracker still names the last complete checkpoint)."""
    from megatron_moca.checkpointing import iteration_dir

    try:
        stage.save(iteration, consumed_tokens)
    except BaseException as e:  # torch's CheckpointException (megatron's saves) derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not disk_full(e, save):
            raise
        last = (f"the last complete checkpoint is {iteration_dir(save, last_saved)}" if last_saved
                else "no checkpoint was complete before it")
        raise TrainingError(f"the checkpoint of iteration {iteration} could not be written: no space left on device "
                            f"under {save}; {last} - free space and rerun the same command to resume") from None


def train(stage: Stage, settings: LoopSettings, iteration: int, consumed_tokens: float = 0.0) -> Dict[str, object]:
    """Run steps iteration+1 .. train_iters (or to the next exit_interval); returns the last record.
    consumed_tokens: the tokens of the iterations before (a resumed checkpoint's count). SIGTERM / SIGUSR1
    save at the next step boundary and raise Preempted (training/preemption.py)."""
    from megatron_moca.training.metrics import MetricsWriter, ThroughputWindow, device_peak_tflops, log_line
    from megatron_moca.training.preemption import Preempted, PreemptionWatch

    rank0 = dist.get_rank() == 0
    metrics = MetricsWriter(settings.save, iteration, settings.tensorboard_dir, settings.wandb) if rank0 else None
    window = ThroughputWindow(settings.world_size, device_peak_tflops(settings.peak_tflops))
    cadence = Cadence(settings.train_iters, settings.log_interval, settings.save_interval, settings.exit_interval)
    record: Dict[str, object] = {}
    last_saved = iteration
    try:
        with PreemptionWatch() as watch:
            while iteration < settings.train_iters:
                start = time.perf_counter()
                try:
                    out = stage.forward_backward(iteration)
                except NonFiniteStep as e:
                    raise diverged(iteration + 1, e.what, e.value, settings.save, last_saved) from None
                for what, value in (("loss", out.loss), ("gradient norm", out.grad_norm)):
                    if value is not None and not math.isfinite(value):  # the weights stay those of a finite step
                        raise diverged(iteration + 1, what, value, settings.save, last_saved)
                norm = stage.apply_update()
                iteration += 1
                grad_norm = out.grad_norm if out.grad_norm is not None else norm
                if grad_norm is not None and not math.isfinite(grad_norm):  # finite gradients whose norm overflowed
                    raise diverged(iteration, "gradient norm", grad_norm, settings.save, last_saved, applied=True)
                window.add(time.perf_counter() - start, out.data_seconds, out.tokens, out.flops)
                consumed_tokens += out.tokens
                if cadence.logs(iteration):
                    record = {"step": iteration, "loss": out.loss, **out.parts, "lr": out.lr,
                              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                              "consumed_tokens": consumed_tokens, **window.take(), **stage.extra_metrics()}
                    if rank0:
                        metrics.write(record)
                        log.info(log_line(record, settings.train_iters))
                if cadence.saves(iteration):
                    _save(stage, iteration, consumed_tokens, settings.save, last_saved)
                    last_saved = iteration
                    if rank0:
                        log.info("saved iteration %d to %s", iteration, settings.save)
                signum = watch.requested(settings.device) if iteration < settings.train_iters else None
                if signum is not None:
                    if last_saved != iteration:
                        _save(stage, iteration, consumed_tokens, settings.save, last_saved)
                    raise Preempted(_preempted_line(signum, iteration, settings.save), signum)
                if cadence.exits(iteration):
                    if rank0:
                        log.info("train.exit_interval=%d: stopping at iteration %d", settings.exit_interval, iteration)
                    break
        stage.finish(iteration, consumed_tokens)
    finally:
        if metrics is not None:
            metrics.close()
    return record


def _preempted_line(signum: int, iteration: int, save: str) -> str:
    import signal

    from megatron_moca.checkpointing import iteration_dir

    return (f"stopped on {signal.Signals(signum).name} after saving iteration {iteration} to "
            f"{iteration_dir(save, iteration)}; rerun the same command to resume")
