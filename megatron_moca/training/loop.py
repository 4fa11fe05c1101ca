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

    @classmethod
    def of(cls, cfg, train_iters: int, world_size: int) -> "LoopSettings":
        from megatron_moca.config.loading import to_dict

        log_cfg = cfg.logging
        wandb = ({"project": log_cfg.wandb_project, "name": log_cfg.wandb_run_name, "config": to_dict(cfg)}
                 if log_cfg.wandb_project else None)
        return cls(cfg.checkpoint.save, train_iters, log_cfg.log_interval, cfg.checkpoint.save_interval,
                   cfg.train.exit_interval, world_size, log_cfg.tensorboard_dir, log_cfg.peak_tflops, wandb)


def write_resolved_config(cfg) -> None:
    """<save>/config.yaml: the run's config as resolved (file + overrides + defaults), replaced atomically."""
    import yaml

    from megatron_moca.config.loading import to_dict

    path = os.path.join(cfg.checkpoint.save, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def open_run_directory(cfg, resumed_from: Optional[str], iteration: int) -> None:
    """The prologue, once the stage has built (or refused) its resume: rank 0 creates the run directory and
    writes config.yaml."""
    if dist.get_rank() != 0:
        return
    if resumed_from:
        log.info("resumed from %s at iteration %d", resumed_from, iteration)
    os.makedirs(cfg.checkpoint.save, exist_ok=True)
    write_resolved_config(cfg)


def diverged(iteration: int, what: str, value, save: str, last_saved: int, applied: bool = False) -> TrainingError:
    """The one-line stop of a run whose step went non-finite; the last checkpoint was written before it."""
    from megatron_moca.checkpointing import iteration_dir

    last = (f"the last good checkpoint is {iteration_dir(save, last_saved)}" if last_saved
            else "no checkpoint was written yet")
    when = "after applying it" if applied else "before applying it"
    return TrainingError(f"non-finite {what} ({value}) at iteration {iteration}: the run stopped {when}; "
                         f"{last} - lower optim.lr or check the data")


def train(stage: Stage, settings: LoopSettings, iteration: int, consumed_tokens: float = 0.0) -> Dict[str, object]:
    """Run steps iteration+1 .. train_iters (or to the next exit_interval); returns the last record.
    consumed_tokens: the tokens of the iterations before (a resumed checkpoint's count)."""
    from megatron_moca.training.metrics import MetricsWriter, ThroughputWindow, device_peak_tflops, log_line

    rank0 = dist.get_rank() == 0
    metrics = MetricsWriter(settings.save, iteration, settings.tensorboard_dir, settings.wandb) if rank0 else None
    window = ThroughputWindow(settings.world_size, device_peak_tflops(settings.peak_tflops))
    cadence = Cadence(settings.train_iters, settings.log_interval, settings.save_interval, settings.exit_interval)
    record: Dict[str, object] = {}
    last_saved = iteration
    try:
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
                stage.save(iteration, consumed_tokens)
                last_saved = iteration
                if rank0:
                    log.info("saved iteration %d to %s", iteration, settings.save)
            if cadence.exits(iteration):
                if rank0:
                    log.info("train.exit_interval=%d: stopping at iteration %d", settings.exit_interval, iteration)
                break
        stage.finish(iteration, consumed_tokens)
    finally:
        if metrics is not None:
            metrics.close()
    return record
