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

    def validate(self, styles=LR_DECAY_STYLES) -> None:
        """Refuse settings AdamW cannot run with: the learning rate above MAX_LR (the update would overflow
        fp32 / bf16 weights within steps), betas outside [0, 1), eps outside (0, 1], negative decay or clip."""
        from megatron_moca.errors import UserError

        if self.lr_decay_style not in styles:
            raise UserError(f"optim.lr_decay_style={self.lr_decay_style!r}: expected one of {', '.join(styles)}")
        if not 0 < self.lr <= MAX_LR or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"optim.lr={self.lr} / optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr and "
                            f"0 < lr <= {MAX_LR:g}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"optim.{name}={getattr(self, name)}: must be within [0, 1)")
        if not 0 < self.adam_eps <= 1:
            raise UserError(f"optim.adam_eps={self.adam_eps}: must be within (0, 1]")
        if not 0 <= self.weight_decay <= MAX_LR / self.lr or self.clip_grad < 0:
            raise UserError(f"optim.weight_decay={self.weight_decay} / optim.clip_grad={self.clip_grad}: need "
                            f"0 <= weight_decay x lr <= {MAX_LR:g} and clip_grad >= 0")
        if not 0 <= self.lr_warmup_fraction <= 1:
            raise UserError(f"optim.lr_warmup_fraction={self.lr_warmup_fraction}: must be within 0..1")


MAX_LR = 1.0
"""The largest learning rate accepted: AdamW moves every weight by about lr per step, so at 3.4e38 the
first update overflows; no recipe of this kind uses more than 1e-3."""


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
