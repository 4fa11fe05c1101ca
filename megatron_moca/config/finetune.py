"""The stage-2 (`moca finetune`) configuration: YAML sections with Megatron's key names.

    model:      the HF Qwen2.5-VL folder to start from (a `moca convert mcore-to-hf` export of stage 1)
    parallel:   replicated (ZeRO-1) or FSDP2 / HSDP sharding over the data-parallel ranks, gradient scale
    train:      iterations (default: one epoch), global batch of pairs, GradCache chunk, seed
    optim:      AdamW, clipping, LR warmup + decay (config.pretrain.OptimConfig, stage-2 defaults)
    checkpoint: run directory, save interval, release dtype
    logging:    log_interval, TensorBoard, W&B
    data:       pair tables and the batch sampler (data.pairs.PairsDataConfig)
    objective:  temperature, hard negatives (objectives.contrastive.ContrastiveConfig)

Defaults are the MoCa reference's stage-2 settings (spec moca-method.md, "Stage 2").
`validate(world_size)` checks everything that can be checked before any process-group work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_moca.config.common import CollectivesConfig, LoggingConfig, OptimConfig, RunDirectoryConfig
from megatron_moca.data.pairs import SAMPLERS, PairsDataConfig
from megatron_moca.errors import UserError
from megatron_moca.objectives.contrastive import ContrastiveConfig

COMPUTE_DTYPES = ("bfloat16", "float32")
GRADIENT_REDUCTIONS = ("sum", "mean")
STAGE2_LR_STYLES = ("constant", "linear", "cosine")


@dataclass
class FinetuneModelConfig:
    """The model stage 2 trains (the whole HF Qwen2.5-VL: vision tower, merger and LLM)."""

    path: Optional[str] = None
    """HF Qwen2.5-VL folder to start from; its tokenizer files are used and copied into checkpoints."""
    compute_dtype: str = "bfloat16"
    """Autocast dtype of the forward/backward (bfloat16 or float32); weights and AdamW state stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more compute)."""


@dataclass
class FinetuneParallelConfig(CollectivesConfig):
    """How the data-parallel ranks hold the model: replicated (the default) or sharded with FSDP2
    (timeout_minutes: config.common.CollectivesConfig)."""

    use_distributed_optimizer: bool = True
    """Replicated path: shard the AdamW state over the data-parallel ranks (ZeRO-1, torch
    ZeroRedundancyOptimizer): per GPU, 3B needs ~34 GB of weights + gradients + 1/N of the state instead
    of ~60 GB. Ignored with fsdp (FSDP shards the state itself)."""
    fsdp: bool = False
    """Shard parameters, gradients and AdamW state over the ranks with torch FSDP2 (fully_shard per
    decoder layer and vision block; bf16 compute with fp32 master weights and fp32 gradient reduction):
    what 7B on 80 GB cards and anything larger need. Checkpoints become per-rank torch.distributed.checkpoint
    folders; the release is still one HF folder."""
    fsdp_shard_size: Optional[int] = None
    """With fsdp: ranks that shard one copy of the model (HSDP: shard within groups of this many ranks,
    replicate across groups - e.g. the GPUs of one node). None: shard over all ranks."""
    gradient_reduction: str = "sum"
    """How the ranks' gradients combine. Every rank computes the global-batch InfoNCE and backpropagates
    it through its own inputs. sum: the gradient of the global-batch loss, the same norm at any number of
    ranks. mean: the MoCa reference's (DeepSpeed averages the ranks' gradients), the global gradient /
    data-parallel size, so optim.clip_grad clips the norm the reference clipped at the same GPU count."""


@dataclass
class FinetuneTrainConfig:
    """Length of the run and the batch."""

    train_iters: Optional[int] = None
    """Optimizer steps (None: one epoch over the pairs, the reference's setting)."""
    global_batch_size: int = 24
    """Pairs per optimizer step over all data-parallel ranks (reference: 24 per GPU); every query is
    scored against every positive of the global batch."""
    micro_batch_size: Optional[int] = None
    """Inputs per forward pass. A rank's queries / positives / negatives, where more than this, are
    embedded in chunks with GradCache (the same gradient, one extra forward); None: one pass each."""
    seed: int = 1234
    """Seed of torch's RNGs (dropout, if the model has any); the batch order is data.seed's."""
    exit_interval: Optional[int] = None
    """Save and stop after the first iteration divisible by this (a job's time slice; rerun to go on)."""


@dataclass
class FinetuneCheckpointConfig(RunDirectoryConfig):
    """The run directory (save, save_interval: config.common.RunDirectoryConfig) and the release."""

    release_dtype: Optional[str] = None
    """dtype of the final release/ folder (default: the starting model's, from its config's `dtype` or
    `torch_dtype`)."""


def _stage2_optim() -> OptimConfig:
    return OptimConfig(lr=2e-5, lr_warmup_fraction=0.05, clip_grad=5.0, lr_decay_style="linear")


@dataclass
class FinetuneConfig:
    """MoCa stage 2: heterogeneous contrastive fine-tuning of the bidirectional embedder."""

    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    parallel: FinetuneParallelConfig = field(default_factory=FinetuneParallelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    optim: OptimConfig = field(default_factory=_stage2_optim)
    checkpoint: FinetuneCheckpointConfig = field(default_factory=FinetuneCheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: PairsDataConfig = field(default_factory=PairsDataConfig)
    objective: ContrastiveConfig = field(default_factory=ContrastiveConfig)

    def validate(self, world_size: int) -> None:
        """Raise UserError on the first bad setting; no process group is needed."""
        from megatron_moca.conversion.hf_config import model_config_from_hf
        from megatron_moca.conversion.hf_io import read_config

        m = self.model
        if not m.path:
            raise UserError("model.path is not set: name the HF Qwen2.5-VL folder to fine-tune "
                            "(e.g. a `moca convert mcore-to-hf` export of stage 1)")
        model_config_from_hf(read_config(m.path))  # names a missing folder or a config that is not Qwen2.5-VL
        if m.compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"model.compute_dtype={m.compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        t = self.train
        if t.global_batch_size < 1 or (t.train_iters is not None and t.train_iters < 1):
            raise UserError("train.global_batch_size and train.train_iters must be >= 1")
        if t.global_batch_size % world_size:
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of the "
                            f"data-parallel size {world_size} (torchrun processes)")
        p = self.parallel
        if p.gradient_reduction not in GRADIENT_REDUCTIONS:
            raise UserError(f"parallel.gradient_reduction={p.gradient_reduction!r}: expected one of "
                            f"{', '.join(GRADIENT_REDUCTIONS)}")
        if p.fsdp_shard_size is not None:
            if not p.fsdp:
                raise UserError("parallel.fsdp_shard_size is set but parallel.fsdp is false: enable FSDP or unset it")
            if p.fsdp_shard_size < 1 or world_size % p.fsdp_shard_size:
                raise UserError(f"parallel.fsdp_shard_size={p.fsdp_shard_size} must be >= 1 and divide the "
                                f"{world_size} data-parallel ranks")
        if t.micro_batch_size is not None and t.micro_batch_size < 1:
            raise UserError("train.micro_batch_size must be >= 1 (or null: no GradCache chunking)")
        self.optim.validate(STAGE2_LR_STYLES)
        c = self.checkpoint
        if not c.save:
            raise UserError("checkpoint.save is not set: name the run directory (e.g. checkpoint.save=runs/stage2)")
        if c.save_interval < 1 or self.logging.log_interval < 1:
            raise UserError("checkpoint.save_interval and logging.log_interval must be >= 1")
        self.logging.validate()
        if c.release_dtype not in (None, "bfloat16", "float16", "float32"):
            raise UserError(f"checkpoint.release_dtype={c.release_dtype!r}: expected bfloat16, float16 or float32")
        d = self.data
        if not d.paths:
            raise UserError("data.paths is empty: name at least one pairs table or folder (MMEB-train layout)")
        for path in d.paths:
            if not os.path.exists(path):
                raise UserError(f"data.paths: {path} does not exist")
        if d.image_root and not os.path.isdir(d.image_root):
            raise UserError(f"data.image_root={d.image_root}: no such directory")
        if d.sampler not in SAMPLERS:
            raise UserError(f"data.sampler={d.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if d.max_length < 16 or d.max_rows_per_subset < 1 or d.num_workers < 0:
            raise UserError("data.max_length must be >= 16, data.max_rows_per_subset >= 1, data.num_workers >= 0")
        if not 1e-4 <= self.objective.temperature <= 1e3 or self.objective.hard_negatives < 0:
            # cosine / temperature: below 1e-4 the logits leave the range where fp32 softmax gradients are finite
            raise UserError(f"objective.temperature={self.objective.temperature} must be within [1e-4, 1000] and "
                            f"objective.hard_negatives={self.objective.hard_negatives} >= 0")

    def iterations(self, steps_per_epoch: int) -> int:
        return self.train.train_iters or steps_per_epoch

    def warmup_iters(self, train_iters: int) -> int:
        o = self.optim
        return o.lr_warmup_iters if o.lr_warmup_iters is not None else int(o.lr_warmup_fraction * self.decay_iters(train_iters))

    def decay_iters(self, train_iters: int) -> int:
        return self.optim.lr_decay_iters or train_iters


def load_finetune_config(path: Optional[str], overrides: Sequence[str] = ()) -> FinetuneConfig:
    from megatron_moca.config.loading import load_config

    return load_config(FinetuneConfig, path, overrides)
