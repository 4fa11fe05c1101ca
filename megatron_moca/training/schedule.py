"""Stage 2's learning-rate schedule, a pure function of the iteration (so a resume needs no state).

The same formulas as megatron-core's OptimizerParamScheduler (optimizer_param_scheduler.py), which
stage 1 uses, so `optim.*` keys mean the same in both stages: linear warmup from 0 over warmup
iterations, then constant / linear / cosine decay from lr to min_lr until decay_iters, min_lr after.
"""

from __future__ import annotations

import math


def learning_rate(iteration: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                  style: str) -> float:
    """The rate of the update made at 0-based `iteration`."""
    if warmup_iters > 0 and iteration <= warmup_iters:
        return lr * iteration / warmup_iters
    if style == "constant":
        return lr
    if iteration > decay_iters:
        return min_lr
    ratio = (iteration - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"unsupported LR decay style {style!r}")
    return min_lr + coeff * (lr - min_lr)
