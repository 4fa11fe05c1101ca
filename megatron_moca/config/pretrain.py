"""The stage-1 (`moca pretrain`) configuration: YAML sections with Megatron's key names.

    model:      ModelConfig (+ `preset: tiny | qwen25vl_3b | qwen25vl_7b`)
    parallel:   tensor/pipeline model parallel sizes, distributed optimizer
    train:      iterations, micro/global batch, seed
    optim:      AdamW, clipping, LR warmup + decay
    checkpoint: save / save_interval / load
    logging:    log_interval, TensorBoard, W&B
    data:       shard folders and blending (data.loader.LoaderConfig)
    sample:     masking and image settings (data.samples.Stage1SampleConfig)
    objective:  mae_weight (objectives.reconstruction.ReconstructionConfig)

`validate(world_size)` checks everything that can be checked before any process-group work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_moca.config.common import CollectivesConfig, LoggingConfig, OptimConfig, RunDirectoryConfig
from megatron_moca.config.model import ModelConfig
from megatron_moca.data.loader import LoaderConfig
from megatron_moca.data.samples import Stage1SampleConfig
from megatron_moca.errors import UserError
from megatron_moca.objectives.reconstruction import ReconstructionConfig



@dataclass
class ParallelConfig(CollectivesConfig):
    """How the model and the batch are split over the processes torchrun starts (timeout_minutes:
    config.common.CollectivesConfig)."""

    tensor_model_parallel_size: int = 1
    """Ranks that shard each layer (must divide the KV heads)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (must divide the LLM's layers); the vision tower sits on the first."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter/all-reduce with the backward pass (GPU clusters). Every
    parameter then needs a gradient on every step, so text-only batches run the vision tower on a
    dummy image (MocaVLM vision_on_text_batches)."""


@dataclass
class TrainConfig:
    """Length of the run and the batch."""

    train_iters: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Packed rows per forward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Packed rows per optimizer step over all data-parallel ranks (micro batches are accumulated)."""
    seed: int = 1234
    """Seed of parameter initialisation (data order and masking: data.seed)."""
    exit_interval: Optional[int] = None
    """Save and stop after the first iteration divisible by this (a job's time slice; rerun to go on)."""


@dataclass
class CheckpointConfig(RunDirectoryConfig):
    """Where the run directory is (save, save_interval: config.common.RunDirectoryConfig) and what the run
    starts from."""

    load: Optional[str] = None
    """Starting weights for a fresh run: a `moca convert hf-to-mcore` folder (or any run directory or
    iter_ folder); the MAE decoder starts from LLM layer L//2. None: random initialisation."""
    optim_fully_reshardable: bool = False
    """Save optimizer state in the layout that loads at another TP/PP (gathers on DP rank 0); the
    default layout is written by every rank in parallel and reloads at the same TP/PP."""
    fully_parallel: bool = True
    """Megatron-LM's fully parallel save and load: each data-parallel rank writes and reads 1/DP of the tensors
    its replica shares (the others exchange what they need), instead of DP rank 0 of each shard writing them
    all and every DP rank reading the whole model on resume. false: megatron-core's default strategies."""
    allow_data_change: bool = False
    """Resume although train.global_batch_size or the data blend (data.paths, weights, max_samples_per_source,
    sample_order, seed) differ from the checkpoint's (refused by default: the run would no longer be the one
    that was started; with it, the loader continues each source from its saved position)."""


@dataclass
class PretrainConfig:
    """MoCa stage 1: modality-aware continual pre-training with the joint reconstruction loss."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    sample: Stage1SampleConfig = field(default_factory=Stage1SampleConfig)
    objective: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    tokenizer: Optional[str] = None
    """Qwen tokenizer folder (default: the copy data.tokenizer finds; see spec data-sources)."""

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size)

    def num_microbatches(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size(world_size))

    def validate(self, world_size: int) -> None:
        """Raise UserError on the first bad setting; no process group is needed."""
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        self.model.validate(tp, pp)
        if world_size % (tp * pp):
            raise UserError(f"world size {world_size} (torchrun processes) is not a multiple of "
                            f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp}")
        dp = self.data_parallel_size(world_size)
        t = self.train
        if t.train_iters < 1 or t.micro_batch_size < 1 or t.global_batch_size < 1:
            raise UserError("train.train_iters, train.micro_batch_size and train.global_batch_size must be >= 1")
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
        from megatron_moca.models.specs import resolve_backend

        # stage-1 rows are packed documents (and padding): `auto` picks a backend that takes them, an explicit
        # one that cannot is refused here, before any process group; the run then builds what was resolved
        requested = self.model.attention_backend
        self.model.attention_backend = resolve_backend(requested, packed_micro_batch=t.micro_batch_size)
        if self.model.fp8 and self.model.attention_backend != "te":
            raise UserError(f"model.fp8={self.model.fp8!r} needs Transformer Engine (the te backend); here "
                            f"attention_backend={requested!r} resolves to {self.model.attention_backend!r} (TE "
                            "absent, no CUDA, or train.micro_batch_size > 1 with packed rows)")
        self.optim.validate()
        if not 0 <= self.lr_warmup_iters < self.lr_decay_iters:
            raise UserError(f"optim.lr_warmup_iters={self.lr_warmup_iters} must be below lr_decay_iters "
                            f"({self.lr_decay_iters}, default train_iters) and not negative")
        c = self.checkpoint
        if not c.save:
            raise UserError("checkpoint.save is not set: name the run directory (e.g. checkpoint.save=runs/stage1)")
        if c.save_interval < 1 or self.logging.log_interval < 1:
            raise UserError("checkpoint.save_interval and logging.log_interval must be >= 1")
        self.logging.validate()
        if c.load and not os.path.isdir(c.load):
            raise UserError(f"checkpoint.load={c.load}: no such directory")
        if not self.data.paths:
            raise UserError("data.paths is empty: name at least one shard folder (moca data prepare / demo)")
        from megatron_moca.data.shards import read_manifest

        for path in self.data.paths:
            read_manifest(path, "data.paths")
        if self.data.weights is not None and len(self.data.weights) != len(self.data.paths):
            raise UserError(f"data.weights has {len(self.data.weights)} entries for {len(self.data.paths)} paths")
        if self.data.max_samples_per_source < 0:
            raise UserError(f"data.max_samples_per_source={self.data.max_samples_per_source}: 0 (all) or a positive cap")
        if not 0 <= self.data.max_bad_sample_fraction <= 1 or self.data.max_member_bytes < 1:
            raise UserError(f"data.max_bad_sample_fraction={self.data.max_bad_sample_fraction} must be within 0..1 and "
                            f"data.max_member_bytes={self.data.max_member_bytes} at least 1")
        if self.data.pack_length < 16:
            raise UserError(f"data.pack_length={self.data.pack_length}: too short for a document")
        if self.sample.max_length > self.data.pack_length:
            raise UserError(f"sample.max_length={self.sample.max_length} exceeds data.pack_length="
                            f"{self.data.pack_length}: documents that long could never be packed")
        if not 0 < self.objective.mae_weight <= 1e3:  # above, the MAE term alone overflows bf16 gradients
            raise UserError(f"objective.mae_weight={self.objective.mae_weight}: must be within (0, 1000]")

    @property
    def lr_decay_iters(self) -> int:
        return self.optim.lr_decay_iters or self.train.train_iters

    @property
    def lr_warmup_iters(self) -> int:
        o = self.optim
        return o.lr_warmup_iters if o.lr_warmup_iters is not None else int(o.lr_warmup_fraction * self.lr_decay_iters)


def load_pretrain_config(path: Optional[str], overrides: Sequence[str] = ()) -> PretrainConfig:
    from megatron_moca.config.loading import load_config

    return load_config(PretrainConfig, path, overrides)
