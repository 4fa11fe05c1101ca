"""megatron-core's DDP wrapper, optimizer (optionally distributed) and LR schedule for a MocaVLM.

Follows Megatron-LM's megatron/training/training.py (setup_model_and_optimizer, get_optimizer_param_scheduler):
the schedule counts iterations here (warmup/decay in optimizer steps, not samples).
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_moca.config.pretrain import PretrainConfig
from megatron_moca.errors import UserError


def wrap_ddp(cfg: PretrainConfig, model):
    """megatron DistributedDataParallel over the data-parallel group (contiguous fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # each bucket's gradient norm is checked before its reduction (as Megatron-LM does by default): a NaN
        # or Inf stops the step inside the backward, before any update (training/pretrain.py names it)
        check_for_nan_in_grad=True)
    return DistributedDataParallel(model.config, ddp_config, model)


def build_optimizer(cfg: PretrainConfig, ddp_model):
    """(megatron optimizer, OptimizerParamScheduler). bf16 parameters get fp32 master weights."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    bf16 = cfg.model.params_dtype == "bfloat16"
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=bf16,
        fp16=cfg.model.params_dtype == "float16", params_dtype=getattr(torch, cfg.model.params_dtype),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer), [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.lr_decay_iters, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=cfg.lr_decay_iters, wd_incr_style="constant",
        # the config wins over a resumed checkpoint's schedule (e.g. train_iters raised to train longer)
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        wsd_decay_steps=cfg.lr_decay_iters - cfg.lr_warmup_iters if o.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if o.lr_decay_style == "WSD" else None)
    return optimizer, scheduler


def inner_optimizers(optimizer):
    """The torch optimizers behind a (chained) megatron optimizer."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer for opt in chained if getattr(opt, "optimizer", None) is not None]


@torch.no_grad()
def prime_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors (AdamW moments, step) before a checkpoint is loaded
    into it: megatron builds the load request from the optimizer's own state, which torch's AdamW
    creates only on its first step. One step with zero gradients at lr 0 creates them and changes no
    parameter (AdamW's decay is lr x wd); the checkpoint then overwrites them."""
    for opt in inner_optimizers(optimizer):
        if opt.state:
            continue
        saved = [(group["lr"], group.get("weight_decay", 0.0)) for group in opt.param_groups]
        grads = {}
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
            for p in group["params"]:
                grads[p] = p.grad
                p.grad = torch.zeros_like(p)
        opt.step()
        for group, (lr, wd) in zip(opt.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, wd
            for p in group["params"]:
                p.grad = grads[p]


def setup(cfg: PretrainConfig, model) -> Tuple[object, object, object]:
    """(ddp model, optimizer, scheduler), with megatron's schedule hooks set on the model config."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import distrib_optimizer

    if cfg.parallel.use_distributed_optimizer and cfg.checkpoint.optim_fully_reshardable \
            and not distrib_optimizer.HAVE_APEX_OR_TE:
        # megatron-core's fully reshardable load expects TE/apex's fused Adam state (no per-parameter `step`)
        raise UserError("checkpoint.optim_fully_reshardable=true needs Transformer Engine or apex (their fused "
                        "Adam); without them use parallel.use_distributed_optimizer=false, whose checkpoints "
                        "reload at any TP/PP")
    ddp_model = wrap_ddp(cfg, model)
    optimizer, scheduler = build_optimizer(cfg, ddp_model)
    config = model.config
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp_model, optimizer, scheduler
