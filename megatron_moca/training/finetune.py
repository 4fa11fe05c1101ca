"""`moca finetune`: MoCa stage 2, contrastive fine-tuning of the HF model (data parallel, torchrun).

    model     transformers Qwen2_5_VLForConditionalGeneration from model.path (or the checkpoint being
              resumed), fp32 weights + AdamW, bf16 autocast; embeddings: bidirectional, mean-pooled, L2
              (embed.embedder.pooled_embeddings - the same function the embedder evaluates with)
    data      pair tables -> BatchPlan (mixed / single_task) -> this rank's slice of each global batch
    step      InfoNCE over the DP-gathered global batch + each query's hard negatives; GradCache when a
              group exceeds train.micro_batch_size (training/contrastive_step.py); gradients summed (or
              averaged: parallel.gradient_reduction) over ranks - each rank's backward is the global
              loss's gradient through its own inputs -, clipped, AdamW
    sharding  replicated weights (+ ZeRO-1 AdamW state), or FSDP2 / HSDP (parallel.fsdp, training/fsdp.py)
    loop      training/loop.py (shared with stage 1): the guard before the update, metrics.jsonl + one
              log line per log_interval, checkpoints every save_interval; exact resume; release/ at the end
Replicated runs use no DDP wrapper: with GradCache only the last chunk would sync anyway, and text-only
batches leave the vision tower without gradients, which DDP would have to search for on every step.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_moca.config.finetune import FinetuneConfig
from megatron_moca.training.loop import StepOutput

log = logging.getLogger("megatron_moca.train")

BUCKET_ELEMENTS = 2**26  # gradients all-reduced per flat bucket of at most this many values


def _identity(cfg: FinetuneConfig, data) -> Dict[str, object]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"model_path": os.path.abspath(cfg.model.path), "subsets": data.fingerprint(),
            "global_batch_size": cfg.train.global_batch_size, "sampler": cfg.data.sampler,
            "data_seed": cfg.data.seed, "hard_negatives": cfg.objective.hard_negatives, "fsdp": cfg.parallel.fsdp}


def starting_dtype(config: dict) -> str:
    """The dtype an HF config records: `dtype` (transformers 5) or `torch_dtype` (4), else bfloat16."""
    for key in ("dtype", "torch_dtype"):
        if config.get(key) in ("bfloat16", "float16", "float32"):
            return config[key]
    return "bfloat16"


def _load_model(folder: str, cfg: FinetuneConfig, device: torch.device):
    """The HF model in fp32 on `device`. With FSDP: rank 0's on the host (fully_shard moves one unit at a
    time), the other ranks' on the meta device (they get their shards from rank 0: training/fsdp.py)."""
    from megatron_moca.conversion.hf_io import load_transformers_model

    if cfg.parallel.fsdp and dist.get_rank() != 0:
        from megatron_moca.training.fsdp import meta_model

        model = meta_model(folder)
    else:
        # replicated: straight onto the GPU (no host copy per rank); FSDP: rank 0 on the host, fully_shard moves it
        model = load_transformers_model(folder, torch.float32, None if cfg.parallel.fsdp else device)
        model = model.to("cpu" if cfg.parallel.fsdp else device)
    model.train()
    if cfg.model.gradient_checkpointing and not cfg.parallel.fsdp:  # FSDP: checkpoint_wrapper before fully_shard
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _optimizer(cfg: FinetuneConfig, params: List[torch.nn.Parameter], device: torch.device):
    """AdamW, its state sharded over the data-parallel ranks where parallel.use_distributed_optimizer (each
    rank updates its share of the parameters and broadcasts them); no weight decay on biases and norm
    scales (1-D tensors)."""
    o = cfg.optim
    decay = [p for p in params if p.dim() > 1]
    plain = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    options = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=device.type == "cuda")
    if cfg.parallel.use_distributed_optimizer and not cfg.parallel.fsdp and dist.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **options)
    return torch.optim.AdamW(groups, **options)


def _park_lm_head(model, tied: bool) -> None:
    """After FSDP sharded the encoder: the output head is not trained (untied, it waits on the host for the
    release); tied, it still holds the embedding's whole pre-sharding tensor, which is dropped (the release
    does not write a tied head)."""
    if tied:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"),
                                                  requires_grad=False)


def sum_gradients(params: List[torch.nn.Parameter], group=None, mean: bool = False) -> None:
    """Sum (mean: average) every parameter's gradient over the data-parallel ranks (missing gradients count as zero:
    a rank whose batch had no image leaves the vision tower without any), in flat buckets. (FSDP runs:
    FSDP reduces.)"""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    bucket: List[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            if mean:
                flat /= dist.get_world_size(group)
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(reduced)
        bucket, size = [], 0

    for p in params:
        if bucket and (size + p.numel() > BUCKET_ELEMENTS or p.grad.dtype != bucket[0].dtype):
            flush()
        bucket.append(p.grad)
        size += p.numel()
    flush()


def _step_flops(model_cfg, step: dict, grad_cache: bool) -> float:
    from megatron_moca.training.flops import StepShape, training_step_flops

    total = 0.0
    for name in ("queries", "positives", "negatives"):
        for b in step[name]:
            grid = b["image_grid_thw"]
            shape = StepShape(documents=b["valid"].sum(1).tolist(), logit_tokens=0, mae_tokens=-1,
                              image_grids=[tuple(g) for g in grid.tolist()] if grid is not None else [])
            total += training_step_flops(model_cfg, shape)
    return total * (4 / 3 if grad_cache else 1.0)  # GradCache: one more forward (a third of fwd + bwd)


class Stage2:
    """Stage 2's side of the training loop (training/loop.py): the contrastive step, gradient reduction and
    clipping, AdamW with the stage-2 LR schedule, the HF-folder or FSDP checkpoint, the release."""

    def __init__(self, cfg: FinetuneConfig, model, encoder, optimizer, loader, train_iters: int, identity: dict,
                 embedding: dict, tied: bool, base_config: dict, device: torch.device):
        from megatron_moca.conversion.hf_config import model_config_from_hf
        from megatron_moca.training.contrastive_step import ContrastiveStep

        self.cfg, self.model, self.encoder, self.optimizer, self.loader = cfg, model, encoder, optimizer, loader
        self.train_iters, self.identity, self.embedding, self.tied = train_iters, identity, embedding, tied
        self.base_config, self.device = base_config, device
        self.model_cfg = model_config_from_hf(base_config)
        self.fsdp = cfg.parallel.fsdp
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.step_fn = ContrastiveStep(encoder, cfg.objective, device, autocast=cfg.model.compute_dtype == "bfloat16")
        self.warmup, self.decay = cfg.warmup_iters(train_iters), cfg.decay_iters(train_iters)
        self.started_at: Optional[int] = None

    def forward_backward(self, iteration: int) -> StepOutput:
        from megatron_moca.training.contrastive_step import pad_negative_chunks
        from megatron_moca.training.fsdp import full_value
        from megatron_moca.training.schedule import learning_rate

        if self.started_at is None:
            self.started_at = iteration
        start = time.perf_counter()
        step = next(self.loader)
        if self.fsdp:
            step = pad_negative_chunks(step, self.device)
        data_seconds = time.perf_counter() - start
        o = self.cfg.optim
        lr = learning_rate(iteration, o.lr, o.min_lr, self.warmup, self.decay, o.lr_decay_style)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=False)  # keep the buffers: sum_gradients fills a missing one once
        loss, parts, chunked = self.step_fn(step)
        if not self.fsdp:  # FSDP reduced the gradients during the backward
            sum_gradients(self.params, mean=self.cfg.parallel.gradient_reduction == "mean")
        grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(
            self.params, o.clip_grad if o.clip_grad > 0 else float("inf"))))
        counts = torch.tensor([float(step["tokens"]), _step_flops(self.model_cfg, step, chunked)],
                              dtype=torch.float64, device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return StepOutput(loss=float(loss), lr=lr, tokens=counts[0].item(), flops=counts[1].item(),
                          data_seconds=data_seconds, grad_norm=grad_norm,
                          parts={"contrastive_loss": parts["contrastive_loss"], "accuracy": parts["accuracy"]})

    def apply_update(self) -> Optional[float]:
        self.optimizer.step()
        return None  # the norm was taken before the update (clipping)

    def extra_metrics(self) -> Dict[str, object]:
        return {}

    def save(self, iteration: int, consumed_tokens: float) -> None:
        from megatron_moca.training.finetune_state import save_checkpoint

        save_checkpoint(self.cfg.checkpoint.save, self.cfg.model.path, self.model, self.optimizer, iteration,
                        self.identity, self.embedding, self.encoder if self.fsdp else None, consumed_tokens)

    def _training_record(self, iteration: int, consumed_tokens: float, release_dtype: str) -> dict:
        """What the release's moca_training.json and model card say about the run (no timestamps: a rerun
        writes the same files)."""
        from megatron_moca import __version__

        c, o = self.cfg, self.cfg.optim
        hyper = {"lr": o.lr, "min_lr": o.min_lr, "lr_decay_style": o.lr_decay_style,
                 "lr_warmup_fraction": o.lr_warmup_fraction, "weight_decay": o.weight_decay, "clip_grad": o.clip_grad,
                 "gradient_reduction": c.parallel.gradient_reduction, "temperature": c.objective.temperature,
                 "hard_negatives": c.objective.hard_negatives, "max_length": c.data.max_length,
                 "min_pixels": c.data.image.min_pixels, "max_pixels": c.data.image.max_pixels,
                 "compute_dtype": c.model.compute_dtype, "micro_batch_size": c.train.micro_batch_size}
        return {"stage": "MoCa stage 2: heterogeneous contrastive fine-tuning",
                "base_model": self.identity["model_path"], "steps": iteration, "consumed_tokens": int(consumed_tokens),
                "global_batch_size": c.train.global_batch_size, "data_parallel_ranks": dist.get_world_size(),
                "sharding": "fsdp" if self.fsdp else "replicated", "release_dtype": release_dtype,
                "megatron_moca": __version__,
                "data": {"paths": [os.path.abspath(p) for p in c.data.paths], "subsets": self.identity["subsets"],
                         "sampler": c.data.sampler},
                "hyperparameters": hyper}

    def finish(self, iteration: int, consumed_tokens: float) -> None:
        """The release, once the last iteration is done (again if this invocation trained, or if a kill
        cut the previous one short)."""
        from megatron_moca.models.transformer_configs import DTYPES
        from megatron_moca.training.finetune_state import RELEASE, write_release

        save = self.cfg.checkpoint.save
        done = os.path.isfile(os.path.join(save, RELEASE, "config.json"))
        trained = self.started_at is not None
        if iteration < self.train_iters or (done and not trained):
            return
        name = self.cfg.checkpoint.release_dtype or starting_dtype(self.base_config)
        folder = write_release(save, self.cfg.model.path, self.model, DTYPES[name], self.embedding, self.tied,
                               self._training_record(iteration, consumed_tokens, name))
        if dist.get_rank() == 0:
            log.info("release: %s (%s)", folder, name)


def finetune(cfg: FinetuneConfig) -> Dict[str, float]:
    """Run (or resume) stage 2; returns the last logged metrics record."""
    from megatron_moca.checkpointing import iteration_dir, read_tracker
    from megatron_moca.conversion.hf_io import read_config
    from megatron_moca.data.pairs import BatchPlan, PairsData
    from megatron_moca.distributed import runtime
    from megatron_moca.embed.inputs import EmbeddingInputs
    from megatron_moca.training.contrastive_batches import ContrastiveSteps, close_loader, step_loader
    from megatron_moca.training.contrastive_step import PooledEncoder
    from megatron_moca.training.finetune_state import check_resumable, lm_head_is_tied, load_optimizer_and_rng
    from megatron_moca.training.loop import LoopSettings, open_run_directory, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world)
    base_config = read_config(cfg.model.path)
    runtime.init_process_group(megatron=False, timeout_minutes=cfg.parallel.timeout_minutes)  # torch + transformers
    rank, dp = dist.get_rank(), dist.get_world_size()
    data = PairsData(cfg.data)  # each rank checks 1/world of the image headers (collective)
    plan = BatchPlan(data.subset_sizes(), cfg.train.global_batch_size, cfg.data.sampler, cfg.data.seed)
    train_iters = cfg.iterations(plan.steps_per_epoch)
    identity = _identity(cfg, data)
    embedding = {"min_pixels": cfg.data.image.min_pixels, "max_pixels": cfg.data.image.max_pixels,
                 "max_length": cfg.data.max_length}  # recorded in every HF folder the run writes
    resumed_at = read_tracker(cfg.checkpoint.save)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.train.seed + rank)
    fsdp = cfg.parallel.fsdp
    folder = iteration_dir(cfg.checkpoint.save, resumed_at) if resumed_at is not None else None
    consumed = 0.0
    if folder:
        consumed = float(check_resumable(folder, identity, reshardable=fsdp).get("consumed_tokens", 0.0))
    # an FSDP checkpoint holds no HF folder: the base model is loaded, then the checkpoint's shards over it
    model = _load_model(folder if folder and not fsdp else cfg.model.path, cfg, device)
    tied = lm_head_is_tied(model)
    encoder = PooledEncoder(model.model, device, always_run_vision=fsdp)
    if fsdp:
        from megatron_moca.training import fsdp as sharding

        full_state = dict(encoder.state_dict()) if rank == 0 else {}  # the whole tensors, before sharding
        sharding.shard(encoder, device, cfg.model.compute_dtype, cfg.parallel.fsdp_shard_size,
                       cfg.parallel.gradient_reduction, checkpointing=cfg.model.gradient_checkpointing)
        sharding.load_from_rank0(encoder, full_state, device)
        del full_state
        _park_lm_head(model, tied)
    optimizer = _optimizer(cfg, [p for p in encoder.parameters() if p.requires_grad], device)
    if folder:
        load_optimizer_and_rng(folder, optimizer, encoder if fsdp else None)
    iteration = resumed_at or 0
    open_run_directory(cfg, folder, iteration, "moca finetune")
    if rank == 0:
        skipped = ", ".join(f"{n} {reason}" for reason, n in data.skipped.items())
        log.info("stage 2: %d pairs in %d subsets, %d steps per epoch, %d iterations, %d data-parallel ranks%s%s",
                 len(data.pairs), len(data.subsets), plan.steps_per_epoch, train_iters, dp,
                 " (FSDP)" if fsdp else "", f" (skipped {sum(data.skipped.values())} rows: {skipped})" if skipped else "")

    # uint8 image rows from the loader workers (8x fewer shared-memory bytes), normalised on the device
    inputs = EmbeddingInputs(cfg.model.path, max_length=cfg.data.max_length, image=cfg.data.image, pixel_dtype=None)
    steps = ContrastiveSteps(data, plan, inputs, rank, dp, train_iters, cfg.objective.hard_negatives,
                             cfg.train.micro_batch_size)
    loader = step_loader(steps, iteration, cfg.data.num_workers)
    stage = Stage2(cfg, model, encoder, optimizer, loader, train_iters, identity, embedding, tied, base_config, device)
    try:
        return train(stage, LoopSettings.of(cfg, train_iters, dp, device), iteration, consumed)
    finally:
        close_loader(loader)
