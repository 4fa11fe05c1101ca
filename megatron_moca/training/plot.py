"""`moca plot RUN_DIR [RUN_DIR ...] --output curves.png`: the curves of one or more runs' metrics.jsonl
against steps - each loss part, the learning rate and the throughput - one panel each, one line per run."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from megatron_moca.errors import UserError


def read_metrics(run_dir: str) -> List[dict]:
    """The whole records of a run directory's metrics.jsonl (a line cut by a kill is left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl (not a moca pretrain / finetune run directory)")
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    if not records:
        raise UserError(f"{path}: no logged steps yet")
    return records


def panels(runs: Dict[str, List[dict]]) -> List[str]:
    """The numeric fields worth a panel, in a fixed order: the loss and its parts, lr, throughput."""
    keys = {k for records in runs.values() for r in records for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    losses = ["loss"] + sorted(k for k in keys if k.endswith("_loss"))
    rest = ["accuracy", "grad_norm", "lr", "tokens_per_s_per_gpu", "tflops_per_gpu"]
    return [k for k in losses + rest if k in keys]


PNG_SOFTWARE = "megatron_moca"
"""The PNG text field (Software) every figure of the project carries: an existing --output file is replaced only
when it has it."""


def check_png_output(output: str, flag: str = "--output") -> None:
    """Refuse (one line) a figure path that is not a .png or that would replace a file the project did not write."""
    if not output.lower().endswith(".png"):
        raise UserError(f"{flag} {output}: name a .png file (the figure is written as PNG)")
    if not os.path.lexists(output):
        return
    written_by_us = False
    if os.path.isfile(output) and not os.path.islink(output):
        from PIL import Image

        try:
            with Image.open(output) as image:
                written_by_us = getattr(image, "text", {}).get("Software") == PNG_SOFTWARE
        except Exception:  # not an image at all: not ours
            written_by_us = False
    if not written_by_us:
        raise UserError(f"{flag} {output}: exists and was not written by megatron_moca; choose a new file name")


def save_png(fig, output: str) -> str:
    """The figure as PNG at exactly `output` (tagged as ours, replaced atomically)."""
    tmp = output + ".tmp"
    fig.savefig(tmp, dpi=100, format="png", metadata={"Software": PNG_SOFTWARE})
    os.replace(tmp, output)
    return output


def plot_runs(run_dirs: Sequence[str], output: str, width: float = 12.0) -> str:
    check_png_output(output)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = {os.path.basename(os.path.normpath(d)) or d: read_metrics(d) for d in run_dirs}
    names = panels(runs)
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, names):
        for label, records in runs.items():
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, output)
    plt.close(fig)
    return output
