"""`moca pretrain`: MoCa stage 1 on megatron-core (TP x PP x DP, one process per device).

    model     MocaVLM with the MAE decoder; from checkpoint.load (a converted HF model) or random, the
              decoder from LLM layer L//2; megatron DDP + (distributed) AdamW + LR schedule
    data      Stage1Loader (per DP rank) -> packed rows -> micro-batches (training/batches.py)
    step      megatron's get_forward_backward_func (no pipelining / 1F1B), joint MLM + MAE loss on the
              last stage normalised by the global batch's masked-token and masked-value counts
    loop      training/loop.py (shared with stage 2): the guard before the update, metrics.jsonl + one log
              line per log_interval, checkpoints every save_interval and at the end; automatic exact
              resume from <save>'s latest checkpoint
Small entry point after torchtitan's train.py / trainer.py and Megatron-LM's run_simple_mcore_train_loop.py.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_moca.config.pretrain import PretrainConfig
from megatron_moca.training.loop import NonFiniteStep, StepOutput

log = logging.getLogger("megatron_moca.train")


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


class Stage1:
    """Stage 1's side of the training loop (training/loop.py): megatron's forward-backward schedule over
    the micro-batches of the global batch, its optimizer step, its dist checkpoint."""

    def __init__(self, cfg: PretrainConfig, layout, model, ddp_model, optimizer, scheduler, loader, batches):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.layout, self.model, self.ddp_model = cfg, layout, model, ddp_model
        self.optimizer, self.scheduler, self.loader, self.batches = optimizer, scheduler, loader, batches
        self.forward_backward_func = get_forward_backward_func()
        self.num_micro = cfg.num_microbatches(layout.world_size)
        self.seq_length = -(-cfg.data.pack_length // cfg.data.pad_to_multiple) * cfg.data.pad_to_multiple
        self.skipped_updates = 0  # fp16 loss-scale overflows since the last record

    def forward_backward(self, iteration: int) -> StepOutput:
        from megatron_moca.training.flops import training_step_flops

        cfg = self.cfg
        step = next(self.batches)
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            losses = self.forward_backward_func(
                forward_step_func=functools.partial(_forward_step, cfg=cfg, step=step),
                data_iterator=iter(step.micro_batches), model=[self.ddp_model], num_microbatches=self.num_micro,
                seq_length=self.seq_length, micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
        except RuntimeError as e:  # megatron's gradient check (check_for_nan_in_grad)
            if "found NaN" not in str(e) and "found Inf" not in str(e):
                raise
            raise NonFiniteStep("gradient", "NaN/Inf") from None
        local_flops = sum(training_step_flops(cfg.model, shape) for shape in step.shapes)
        sums = _reduce_step(losses, local_flops, self.layout)
        mlm = sums["mlm_sum"] / max(step.mlm_tokens, 1)
        mae = sums["mae_sum"] / step.mae_values if step.mae_values else 0.0
        return StepOutput(loss=mlm + cfg.objective.mae_weight * mae, lr=self.optimizer.param_groups[0]["lr"],
                          tokens=step.tokens, flops=sums["flops"], data_seconds=step.data_seconds,
                          parts={"mlm_loss": mlm, "mae_loss": mae})

    def apply_update(self) -> Optional[float]:
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        else:
            self.skipped_updates += 1
        return float(grad_norm) if grad_norm is not None else None

    def extra_metrics(self) -> Dict[str, object]:
        layout = self.layout
        reads = self.batches.replica_source in (None, layout.rank)
        extra = {"skipped_updates": self.skipped_updates,
                 "skipped_samples": _skipped_samples(self.loader, reads, layout.device)}
        self.skipped_updates = 0
        return extra

    def save(self, iteration: int, consumed_tokens: float) -> None:
        from megatron_moca.training.state import save_training_checkpoint

        save_training_checkpoint(self.cfg, self.layout, self.model, self.optimizer, self.scheduler, iteration,
                                 self.loader.state_dict(), consumed_tokens)

    def finish(self, iteration: int, consumed_tokens: float) -> None:
        pass  # the cadence saved the last iteration


def pretrain(cfg: PretrainConfig) -> Dict[str, float]:
    """Run (or resume) stage 1; returns the last logged metrics record."""
    from megatron.core import parallel_state as ps

    from megatron_moca.data.loader import Stage1Loader, stage1_builder_factory
    from megatron_moca.distributed import runtime
    from megatron_moca.training.batches import StepBatches
    from megatron_moca.training.loop import LoopSettings, open_run_directory, train
    from megatron_moca.training.optimizer import setup
    from megatron_moca.training.state import check_resume_data, has_checkpoint, load_training_checkpoint

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world)
    check_resume_data(cfg)  # a changed batch or data blend is refused before anything is built
    p = cfg.parallel
    layout = runtime.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=cfg.train.seed,
                                timeout_minutes=p.timeout_minutes)
    resuming = has_checkpoint(cfg.checkpoint.save)
    model = build_model(cfg, layout.device, starting_weights=not resuming)
    ddp_model, optimizer, scheduler = setup(cfg, model)
    iteration, loader_state, resumed_from, consumed = 0, None, None, 0.0
    if resuming:
        resumed = load_training_checkpoint(cfg, layout, model, optimizer, scheduler)
        iteration, loader_state, resumed_from = resumed.iteration, resumed.loader_state, resumed.folder
        consumed = resumed.consumed_tokens
    open_run_directory(cfg, resumed_from, iteration, "moca pretrain")

    tokens = cfg.model.tokens
    loader = Stage1Loader(cfg.data, stage1_builder_factory(cfg.tokenizer, cfg.sample), tokens.pad_token_id,
                          tokens.image_token_id, layout.dp_rank, layout.data_parallel_size, state=loader_state)
    replica_group, source, stages = _replica_source(layout)
    builds = source in (None, layout.rank)  # only the replica's source reads rows and touches images
    rows = iter(loader) if builds else None
    batches = StepBatches(rows, cfg.num_microbatches(world),
                          cfg.train.micro_batch_size, layout.device, getattr(torch, cfg.model.params_dtype),
                          _image_decoder(cfg, layout.device) if builds else None, ps.get_data_parallel_group(),
                          replica_group, source, stages, causal=cfg.model.attention == "causal")
    stage = Stage1(cfg, layout, model, ddp_model, optimizer, scheduler, loader, batches)
    try:
        return train(stage, LoopSettings.of(cfg, cfg.train.train_iters, world, layout.device), iteration, consumed)
    finally:
        if rows is not None:  # the loader's worker pool stops now, gracefully (its workers ignore SIGTERM)
            rows.close()


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


def _replica_source(layout):
    """(the replica's TP x PP group, the global rank in it that reads the data: TP 0 of stage 0, each member's
    global rank -> (first stage, last stage)), or (None, None, None) when the replica is one rank."""
    from megatron.core import parallel_state as ps

    if layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size == 1:
        return None, None, None
    group = ps.get_model_parallel_group()
    members = [None] * dist.get_world_size(group)
    dist.all_gather_object(members, (layout.tp_rank, layout.pp_rank, layout.rank), group=group)
    last = layout.pipeline_model_parallel_size - 1
    stages = {rank: (pp == 0, pp == last) for _, pp, rank in members}
    return group, next(rank for tp, pp, rank in members if tp == 0 and pp == 0), stages


def _image_decoder(cfg: PretrainConfig, device: torch.device):
    """DALI's decoder for image_pipeline dali: nvJPEG ("mixed") decode and resize on this rank's GPU."""
    from megatron_moca.data.samples import resolve_image_pipeline

    if resolve_image_pipeline(cfg.sample.image_pipeline) != "dali":
        return None
    from megatron_moca.data.dali import DaliImageDecoder

    return DaliImageDecoder(cfg.sample.image, device_id=device.index if device.type == "cuda" else None)
