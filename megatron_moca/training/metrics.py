"""Rank 0's record of a run: one dense log line per log_interval, <save>/metrics.jsonl, TensorBoard.

After torchtitan's components/metrics.py (MFU from a FLOP count and the device's peak, one line).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from typing import Dict, Optional

import torch

log = logging.getLogger("megatron_moca.train")

# dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "H800": 989.4, "B200": 2250.0,
                    "B300": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.1}

METRICS_FILE = "metrics.jsonl"


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """The bf16 peak for MFU: the configured value, else the GPU's by name; None on the CPU."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def memory_gib() -> float:
    """Peak device memory of this process (GPU), or its peak resident set (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _logged_step(line: str) -> Optional[int]:
    """The step of one metrics.jsonl line; None for a line that is not a whole record (a kill mid-write)."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


class MetricsWriter:
    """Appends one JSON object per logged step; on resume drops records past the resumed iteration
    (they were logged by the killed run and are logged again) and any partial line a kill left."""

    def __init__(self, run_dir: str, resumed_iteration: int, tensorboard_dir: Optional[str] = None,
                 wandb: Optional[dict] = None):
        """wandb: {"project", "name", "config"} to mirror every record to a W&B run (None: no W&B)."""
        self.path = os.path.join(run_dir, METRICS_FILE)
        if os.path.isfile(self.path):
            with open(self.path, errors="replace") as f:
                lines = [(line, _logged_step(line)) for line in f if line.strip()]
            partial = sum(step is None for _, step in lines)
            if partial:
                log.warning("%s: dropped %d line(s) that are not whole records (a run killed while writing)",
                            self.path, partial)
            kept = [line if line.endswith("\n") else line + "\n" for line, step in lines
                    if step is not None and step <= resumed_iteration]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self.tensorboard = self._tensorboard(tensorboard_dir or os.path.join(run_dir, "tensorboard"),
                                             explicit=tensorboard_dir is not None)
        self.wandb = self._wandb(run_dir, **wandb) if wandb else None

    @staticmethod
    def _wandb(run_dir: str, project: str, name: Optional[str], config: dict):
        import hashlib

        from megatron_moca.errors import UserError

        try:
            import wandb
        except ImportError:
            raise UserError("logging.wandb_project is set but wandb is not installed (pip install wandb)") from None
        run_id = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]  # the run directory's
        try:
            return wandb.init(project=project, name=name or os.path.basename(os.path.normpath(run_dir)), id=run_id,
                              resume="allow", dir=run_dir, config=config)
        except Exception as e:  # not logged in (UsageError), no network (CommError), ...: W&B's own message, one line
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"logging.wandb_project={project}: W&B did not start ({type(e).__name__}: {first}); run "
                            "`wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline to write the run under "
                            "checkpoint.save") from None

    @staticmethod
    def _tensorboard(folder: str, explicit: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            if explicit:
                log.warning("logging.tensorboard_dir is set but tensorboard is not installed")
            return None
        return SummaryWriter(folder)

    def write(self, record: Dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
        scalars = {f"train/{key}": value for key, value in _scalars(record)
                   if key != "step" and value is not None and math.isfinite(value)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def finite_json(value):
    """`value` with every non-finite float as None: JSON has no NaN / Infinity (Python's json writes them, and
    strict readers - jq, JavaScript, pandas' engine - refuse the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _scalars(record: dict):
    """(name, number) pairs of a record; nested counts (skipped_samples) as name/kind."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from ((f"{key}/{k}", v) for k, v in value.items())
        else:
            yield key, value


class ThroughputWindow:
    """Wall time, data wait, tokens and model FLOPs summed over the steps since the last logged one;
    take() turns them into the record's speed fields (per device: over world_size processes)."""

    def __init__(self, world_size: int, peak_tflops: Optional[float]):
        self.world, self.peak = world_size, peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.seconds = self.data_seconds = self.tokens = self.flops = 0.0

    def add(self, seconds: float, data_seconds: float, tokens: float, flops: float) -> None:
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.tokens += tokens
        self.flops += flops

    def take(self) -> Dict[str, Optional[float]]:
        """tokens_per_s(_per_gpu), tflops_per_gpu, mfu (None without a known peak), mem_gib,
        data_wait_frac of the window, which then starts over."""
        tflops = self.flops / self.seconds / self.world / 1e12
        fields = {"tokens_per_s": self.tokens / self.seconds,
                  "tokens_per_s_per_gpu": self.tokens / self.seconds / self.world,
                  "tflops_per_gpu": tflops, "mfu": tflops / self.peak if self.peak else None,
                  "mem_gib": memory_gib(), "data_wait_frac": self.data_seconds / self.seconds}
        self._reset()
        return fields


def log_line(record: Dict[str, float], train_iters: int) -> str:
    """The one dense line rank 0 prints: the loss and each of its parts (`*_loss`), then the rest."""
    r = record
    parts = [f"iter {r['step']}/{train_iters}", f"loss {r['loss']:.4f}"]
    parts += [f"{key[:-len('_loss')]} {value:.4f}" for key, value in r.items() if key.endswith("_loss")]
    if "accuracy" in r:
        parts.append(f"acc {100 * r['accuracy']:.1f}%")
    parts += [f"grad_norm {r['grad_norm']:.3f}", f"lr {r['lr']:.3e}",
              f"tok/s/gpu {r['tokens_per_s_per_gpu']:.0f}", f"TFLOP/s/gpu {r['tflops_per_gpu']:.2f}"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts += [f"mem {r['mem_gib']:.1f}GiB", f"data {100 * r['data_wait_frac']:.0f}%"]
    if r.get("skipped_samples"):
        parts.append("skipped " + ", ".join(f"{kind} {n}" for kind, n in r["skipped_samples"].items()))
    return " | ".join(parts)
