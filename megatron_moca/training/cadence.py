"""When a trainer logs, saves and stops: one rule for stage 1 and stage 2 (megatron's training.py flags).

After finishing `iteration` (1-based) of `train_iters`: log every log_interval and at the end; save every
save_interval, at the end, and where train.exit_interval stops the run (so the rerun resumes there);
stop early at each multiple of exit_interval before the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Cadence:
    train_iters: int
    log_interval: int
    save_interval: int
    exit_interval: Optional[int] = None
    """None or 0: never stop early."""

    def logs(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def _at_exit_interval(self, iteration: int) -> bool:
        return bool(self.exit_interval) and iteration % self.exit_interval == 0

    def exits(self, iteration: int) -> bool:
        return self._at_exit_interval(iteration) and iteration < self.train_iters

    def saves(self, iteration: int) -> bool:
        return iteration % self.save_interval == 0 or iteration == self.train_iters or self._at_exit_interval(iteration)
