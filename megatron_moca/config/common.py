"""Config sections both stages share, defined once: the optimizer, the run directory, logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, gradient clipping and Megatron's LR schedule. Defaults: the
    MoCa reference's stage-1 settings (spec moca-method.md)."""

    lr: float = 2e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW's denominator epsilon."""
    clip_grad: float = 5.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    lr_warmup_iters: Optional[int] = None
    """Iterations of linear warmup from 0 (None: lr_warmup_fraction of the decay iterations)."""
    lr_warmup_fraction: float = 0.1
    """Warmup as a fraction of lr_decay_iters, where lr_warmup_iters is not set."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the LR decays to min_lr (default: train_iters)."""
    lr_decay_style: str = "linear"
    """One of constant, linear, cosine, inverse-square-root, WSD."""


@dataclass
class RunDirectoryConfig:
    """The run directory and how often it gets a checkpoint (each stage's checkpoint section adds its own keys)."""

    save: Optional[str] = None
    """Run directory: config.yaml, metrics.jsonl, iter_XXXXXXX/, latest_checkpointed_iteration.txt (stage 2
    also release/ at the end). A run whose directory already holds a checkpoint resumes from it."""
    save_interval: int = 500
    """Save every this many iterations (and at the end)."""


@dataclass
class LoggingConfig:
    """What rank 0 reports."""

    log_interval: int = 10
    """Iterations per log line (and metrics.jsonl record)."""
    tensorboard_dir: Optional[str] = None
    """Mirror the metrics to TensorBoard here (default: <save>/tensorboard when tensorboard imports)."""
    peak_tflops: Optional[float] = None
    """Dense bf16 peak of one device for MFU (default: known GPUs by name; no MFU on the CPU)."""
    wandb_project: Optional[str] = None
    """Mirror the metrics to Weights & Biases under this project (needs `pip install wandb`; WANDB_MODE=offline
    writes the run under <save>/wandb for a later `wandb sync`). The run's id follows the run directory, so
    a resumed run continues the same W&B run."""
    wandb_run_name: Optional[str] = None
    """The W&B run's name (default: the run directory's name)."""

    def validate(self) -> None:
        """Refuse up front what would fail at the first record."""
        import importlib.util

        from megatron_moca.errors import UserError

        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise UserError("logging.wandb_project is set but wandb is not installed (pip install wandb)")
