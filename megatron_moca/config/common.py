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
        """Refuse settings AdamW cannot run with: its first step moves a weight by up to lr / (1 - adam_beta1),
        a number torch passes to its float32 kernels, so above FLOAT32_MAX it stops with an overflow inside
        the optimizer (so does lr x weight_decay, the decoupled decay's factor); betas outside [0, 1), an eps
        that is not positive (0 / 0 where a gradient is zero), a negative decay or clip."""
        from megatron_moca.errors import UserError

        if self.lr_decay_style not in styles:
            raise UserError(f"optim.lr_decay_style={self.lr_decay_style!r}: expected one of {', '.join(styles)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"optim.{name}={getattr(self, name)}: must be within [0, 1)")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"optim.lr={self.lr} / optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr and lr > 0")
        first_step = self.lr / (1 - self.adam_beta1)
        if first_step > FLOAT32_MAX:
            raise UserError(f"optim.lr={self.lr:g}: AdamW's first step, lr / (1 - adam_beta1) = {first_step:.3g}, "
                            f"overflows float32 (largest {FLOAT32_MAX:.3g}); no recipe of this kind uses more than 1e-3")
        if self.adam_eps <= 0:
            raise UserError(f"optim.adam_eps={self.adam_eps}: must be > 0")
        if self.weight_decay < 0 or self.lr * self.weight_decay > FLOAT32_MAX or self.clip_grad < 0:
            raise UserError(f"optim.weight_decay={self.weight_decay} / optim.clip_grad={self.clip_grad}: need "
                            f"weight_decay >= 0 with lr x weight_decay <= {FLOAT32_MAX:.3g}, and clip_grad >= 0")
        if not 0 <= self.lr_warmup_fraction <= 1:
            raise UserError(f"optim.lr_warmup_fraction={self.lr_warmup_fraction}: must be within 0..1")


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: torch's optimizer kernels take their step sizes as float32 scalars."""


@dataclass
class CollectivesConfig:
    """How long collectives may wait (both stages' parallel sections)."""

    timeout_minutes: int = 30
    """Timeout of the process group's start and of every collective (NCCL's default is 10 minutes): rank 0
    alone reads or writes multi-GB folders between collectives (loading, saves, the release), and a rank
    that waits longer is aborted by NCCL's watchdog. Megatron-LM's --distributed-timeout-minutes. For a hang,
    torch's flight recorder shows the last collectives of every rank: run with TORCH_NCCL_TRACE_BUFFER_SIZE=2000
    TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_FR_DUMP_TEMP_FILE=/shared/fr_ (then `torchfrtrace /shared/fr_*`)."""


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
