"""`moca pretrain`: MoCa stage 1 on megatron-core (TP x PP x DP, one process per device).

    model     MocaVLM with the MAE decoder; from checkpoint.load (a converted HF model) or random, the
              decoder from LLM layer L//2; megatron DDP + (distributed) AdamW + LR schedule
    data      Stage1Loader (per DP rank) -> packed rows -> micro-batches (training/batches.py)
    step      megatron's get_forward_backward_func (no pipelining / 1F1B), joint MLM + MAE loss on the
              last stage normalised by the global batch's masked-token and masked-value counts
    record    metrics.jsonl + one log line per log_interval; checkpoints every save_interval and at the
              end; automatic exact resume from <save>'s latest checkpoint
Small entry point after torchtitan's train.py / trainer.py and Megatron-LM's run_simple_mcore_train_loop.py.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Dict

import torch
import torch.distributed as dist

from megatron_moca.config.loading import to_dict
from megatron_moca.config.pretrain import PretrainConfig
from megatron_moca.errors import UserError
from megatron_moca.training.cadence import Cadence

log = logging.getLogger("megatron_moca.train")

CONFIG_FILE = "config.yaml"


class TrainingError(UserError):
    """The run cannot go on (e.g. a non-finite loss); the last checkpoint is intact."""


def write_resolved_config(cfg) -> None:
    """<save>/config.yaml: the run's config as resolved (file + overrides + defaults), replaced atomically."""
    import yaml

    path = os.path.join(cfg.checkpoint.save, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def build_model(cfg: PretrainConfig, device: torch.device, starting_weights: bool = True):
    """The stage-1 model for this rank's pipeline stage, with its starting weights (checkpoint.load or
    random, the MAE decoder from layer L//2) unless starting_weights=False (a resume loads everything)."""
    from megatron_moca.checkpointing import checkpoint_has_prefix, load_model, resolve_checkpoint
    from megatron_moca.models.heads import initialize_mae_decoder
    from megatron_moca.models.vlm import MocaVLM

    model = MocaVLM(cfg.model, mae_decoder=True,
                    vision_on_text_batches=cfg.parallel.overlap_grad_reduce).to(device)
    if not starting_weights:
        return model
    with_decoder = False
    if cfg.checkpoint.load:
        folder = resolve_checkpoint(cfg.checkpoint.load)
        with_decoder = checkpoint_has_prefix(folder, "mae_decoder.")
        load_model(model, folder, without=() if with_decoder else ("mae_decoder.",))
        log.info("loaded starting weights from %s%s", folder, "" if with_decoder else " (MAE decoder from layer L//2)")
    if not with_decoder:
        initialize_mae_decoder(model)
    return model


def _forward_step(data_iterator, model, cfg: PretrainConfig, step):
    """megatron's forward_step_func: the model on one micro-batch and, on the last stage, the loss."""
    from megatron_moca.objectives.reconstruction import reconstruction_loss

    batch = next(data_iterator)
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                   pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    inner = model.module
    if not inner.post_process:
        return hidden, None  # not reached: megatron calls the loss only on the last stage

    def loss_func(output):
        loss, parts = reconstruction_loss(inner, output, batch, cfg.objective, mlm_tokens=step.mlm_tokens,
                                          mae_values=step.mae_values)
        return loss * step.loss_scale, {"mlm_sum": parts["mlm_sum"], "mae_sum": parts["mae_sum"]}

    return hidden, loss_func


def _reduce_step(losses, local_flops: float, layout, dtype=torch.float64) -> Dict[str, float]:
    """mlm_sum, mae_sum (from the last stage) and the model FLOPs of the whole global batch, on every rank."""
    from megatron.core import parallel_state as ps

    mlm = sum(float(d["mlm_sum"]) for d in losses) if layout.is_last_stage else 0.0
    mae = sum(float(d["mae_sum"]) for d in losses) if layout.is_last_stage else 0.0
    # every stage of a replica counts the same FLOPs: /pp, summed over the pipeline group
    values = torch.tensor([mlm, mae, local_flops / layout.pipeline_model_parallel_size], dtype=dtype,
                          device=layout.device)
    if layout.pipeline_model_parallel_size > 1:
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    if layout.data_parallel_size > 1:
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    mlm, mae, flops = values.tolist()
    return {"mlm_sum": mlm, "mae_sum": mae, "flops": flops}


def pretrain(cfg: PretrainConfig) -> Dict[str, float]:
    """Run (or resume) stage 1; returns the last logged metrics record."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_moca.data.loader import Stage1Loader, stage1_builder_factory
    from megatron_moca.distributed import runtime
    from megatron_moca.training.batches import StepBatches
    from megatron_moca.training.flops import step_shape_of, training_step_flops
    from megatron_moca.training.metrics import MetricsWriter, ThroughputWindow, device_peak_tflops, log_line
    from megatron_moca.training.optimizer import setup
    from megatron_moca.training.state import has_checkpoint, load_training_checkpoint, save_training_checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world)
    p = cfg.parallel
    layout = runtime.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=cfg.train.seed)
    rank0 = layout.rank == 0
    save = cfg.checkpoint.save
    resuming = has_checkpoint(save)
    model = build_model(cfg, layout.device, starting_weights=not resuming)
    ddp_model, optimizer, scheduler = setup(cfg, model)
    iteration, loader_state = 0, None
    if resuming:
        resumed = load_training_checkpoint(cfg, layout, model, optimizer, scheduler)
        iteration, loader_state = resumed.iteration, resumed.loader_state
        if rank0:
            log.info("resumed from %s at iteration %d", resumed.folder, iteration)
    if rank0:  # only now: a resume refused above leaves the run directory as it was
        os.makedirs(save, exist_ok=True)
        write_resolved_config(cfg)

    num_micro = cfg.num_microbatches(world)
    tokens = cfg.model.tokens
    loader = Stage1Loader(cfg.data, stage1_builder_factory(cfg.tokenizer, cfg.sample), tokens.pad_token_id,
                          tokens.image_token_id, layout.dp_rank, layout.data_parallel_size, state=loader_state)
    replica_group, source = _replica_source(layout)
    batches = StepBatches(iter(loader) if source in (None, layout.rank) else None, num_micro,
                          cfg.train.micro_batch_size, layout.device, getattr(torch, cfg.model.params_dtype),
                          _image_decoder(cfg), ps.get_data_parallel_group(), replica_group, source)
    seq_length = -(-cfg.data.pack_length // cfg.data.pad_to_multiple) * cfg.data.pad_to_multiple
    forward_backward = get_forward_backward_func()
    metrics = MetricsWriter(save, iteration, cfg.logging.tensorboard_dir) if rank0 else None
    window = ThroughputWindow(world, device_peak_tflops(cfg.logging.peak_tflops))
    cadence = Cadence(cfg.train.train_iters, cfg.logging.log_interval, cfg.checkpoint.save_interval,
                      cfg.train.exit_interval)
    skipped = 0  # fp16 loss-scale overflows since the last log line
    record: Dict[str, float] = {}
    last_saved = iteration
    try:
        while iteration < cfg.train.train_iters:
            start = time.perf_counter()
            step = next(batches)
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            try:
                losses = forward_backward(
                    forward_step_func=functools.partial(_forward_step, cfg=cfg, step=step),
                    data_iterator=iter(step.micro_batches), model=[ddp_model], num_microbatches=num_micro,
                    seq_length=seq_length, micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
            except RuntimeError as e:  # megatron's gradient check (check_for_nan_in_grad)
                if "found NaN" not in str(e) and "found Inf" not in str(e):
                    raise
                raise _diverged(iteration + 1, "gradient", "NaN/Inf", cfg, last_saved) from None
            local_flops = sum(training_step_flops(cfg.model, step_shape_of(b, cfg.model.attention == "causal"))
                              for b in step.micro_batches)
            sums = _reduce_step(losses, local_flops, layout)
            mlm = sums["mlm_sum"] / max(step.mlm_tokens, 1)
            mae = sums["mae_sum"] / step.mae_values if step.mae_values else 0.0
            loss = mlm + cfg.objective.mae_weight * mae
            if not math.isfinite(loss):  # decided before the update: the weights stay those of a finite step
                raise _diverged(iteration + 1, "loss", loss, cfg, last_saved)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
            updated, grad_norm, _ = optimizer.step()
            if updated:
                scheduler.step(increment=1)
            iteration += 1
            if grad_norm is not None and not math.isfinite(grad_norm):  # finite gradients whose norm overflowed
                raise _diverged(iteration, "gradient norm", grad_norm, cfg, last_saved)
            window.add(time.perf_counter() - start, step.data_seconds, step.tokens, sums["flops"])
            skipped += 0 if updated else 1
            if cadence.logs(iteration):
                record = {"step": iteration, "loss": loss, "mlm_loss": mlm, "mae_loss": mae, "lr": lr,
                          "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                          **window.take(), "skipped_updates": skipped,
                          "skipped_samples": _skipped_samples(loader, source in (None, layout.rank), layout.device)}
                skipped = 0
                if rank0:
                    metrics.write(record)
                    log.info(log_line(record, cfg.train.train_iters))
            if cadence.saves(iteration):
                save_training_checkpoint(cfg, layout, model, optimizer, scheduler, iteration, loader.state_dict())
                last_saved = iteration
                if rank0:
                    log.info("saved iteration %d to %s", iteration, save)
            if cadence.exits(iteration):
                if rank0:
                    log.info("train.exit_interval=%d: stopping at iteration %d", cfg.train.exit_interval, iteration)
                break
    finally:
        if metrics is not None:
            metrics.close()
    return record


def _skipped_samples(loader, reads: bool, device) -> Dict[str, int]:
    """Samples the run's loaders skipped so far, by reason (shards.SKIP_REASONS), summed over the ranks
    that read data (collective: every rank calls it)."""
    from megatron_moca.data.shards import SKIP_REASONS

    counts = loader.state_dict()["skipped"] if reads else {}
    kinds = list(SKIP_REASONS) + sorted(set(counts) - set(SKIP_REASONS))  # + reasons of older checkpoints
    totals = torch.tensor([counts.get(kind, 0) for kind in kinds], dtype=torch.int64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(totals[:len(SKIP_REASONS)])
    return {kind: int(n) for kind, n in zip(kinds, totals.tolist()) if n}


def _diverged(iteration: int, what: str, value, cfg, last_saved: int) -> "TrainingError":
    """The one-line stop of a run whose step went non-finite; the last checkpoint was written before it."""
    from megatron_moca.checkpointing import iteration_dir

    last = (f"the last good checkpoint is {iteration_dir(cfg.checkpoint.save, last_saved)}" if last_saved
            else "no checkpoint was written yet")
    return TrainingError(f"non-finite {what} ({value}) at iteration {iteration}: the run stopped before applying it; "
                         f"{last} - lower optim.lr or check the data")


def _replica_source(layout):
    """(the replica's TP x PP group, the global rank in it that reads the data: TP 0 of stage 0), or
    (None, None) when the replica is one rank."""
    from megatron.core import parallel_state as ps

    if layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size == 1:
        return None, None
    group = ps.get_model_parallel_group()
    members = [None] * dist.get_world_size(group)
    dist.all_gather_object(members, (layout.tp_rank, layout.pp_rank, layout.rank), group=group)
    return group, next(rank for tp, pp, rank in members if tp == 0 and pp == 0)


def _image_decoder(cfg: PretrainConfig):
    from megatron_moca.data.samples import resolve_image_pipeline

    if resolve_image_pipeline(cfg.sample.image_pipeline) != "dali":
        return None
    from megatron_moca.data.dali import DaliImageDecoder

    return DaliImageDecoder(cfg.sample.image)
