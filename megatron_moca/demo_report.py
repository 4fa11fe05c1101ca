"""What `moca demo` leaves to look at in its work directory:

    results.md    the stages (steps, first and last losses), the export check, and retrieval before and
                  after stage 2 next to chance level
    results.png   both stages' loss curves and the retrieval scores as bars (chance marked)
"""

from __future__ import annotations

import os
from typing import Dict, List

METRICS = ("recall@1", "recall@10", "ndcg@10")


def chance(r: dict) -> Dict[str, float]:
    """Expected scores of a random ranking with one relevant document per query."""
    n = r["documents"]
    recall10 = min(1.0, 10 / n)
    # nDCG@10 of one relevant document at a uniform random rank: mean over its ranks 1..10 of 1/log2(rank+1)
    import math

    ndcg10 = sum(1 / math.log2(rank + 1) for rank in range(1, min(10, n) + 1)) / n
    return {"recall@1": 1 / n, "recall@10": recall10, "ndcg@10": ndcg10}


def write_results_md(summary: dict, path: str) -> str:
    r1, r2 = summary["retrieval"], summary["retrieval_stage2"]
    base = chance(r1)
    lines = [
        "# moca demo results", "",
        f"Work directory: `{summary['workdir']}`", "",
        "| stage | steps | first loss | last loss |", "|---|---|---|---|",
        f"| 1: MLM + MAE (`{os.path.basename(summary['stage1'])}`) | {summary['last']['step']} | "
        f"{summary['first']['loss']:.4f} (step {summary['first']['step']}) | {summary['last']['loss']:.4f} |",
        f"| 2: contrastive (`{os.path.basename(summary['stage2'])}`) | {summary['stage2_last']['step']} | "
        f"{summary['stage2_first']['loss']:.4f} (step {summary['stage2_first']['step']}) | "
        f"{summary['stage2_last']['loss']:.4f} |", "",
        f"Stage-1 export `{os.path.basename(summary['hf'])}` checked against the checkpoint: {summary['verify']}", "",
        f"Retrieval stand-in ({r1['queries']} queries, {r1['documents']} page images, one relevant each):", "",
        "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS),
        "| chance | " + " | ".join(f"{base[m]:.3f}" for m in METRICS) + " |",
        "| stage-1 export | " + " | ".join(f"{r1[m]:.3f}" for m in METRICS) + " |",
        "| stage-2 release | " + " | ".join(f"{r2[m]:.3f}" for m in METRICS) + " |", "",
        "Curves and bars: results.png.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def write_results_png(summary: dict, stage1: List[dict], stage2: List[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_moca.training.plot import save_png

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("loss", "mlm_loss", "mae_loss"):
        points = [(r["step"], r[key]) for r in stage1 if isinstance(r.get(key), (int, float))]
        if points:
            axes[0].plot(*zip(*points), label=key, marker="o", markersize=3)
    axes[0].set_title("stage 1: MLM + MAE")
    points = [(r["step"], r["loss"]) for r in stage2]
    axes[1].plot(*zip(*points), label="InfoNCE", color="tab:purple", marker="o", markersize=3)
    axes[1].set_title("stage 2: contrastive")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r1, r2, base = summary["retrieval"], summary["retrieval_stage2"], chance(summary["retrieval"])
    x = range(len(METRICS))
    axes[2].bar([i - 0.2 for i in x], [r1[m] for m in METRICS], width=0.4, label="stage-1 export")
    axes[2].bar([i + 0.2 for i in x], [r2[m] for m in METRICS], width=0.4, label="stage-2 release")
    axes[2].scatter(list(x), [base[m] for m in METRICS], marker="_", s=600, color="black", label="chance", zorder=3)
    axes[2].set_xticks(list(x), METRICS)
    axes[2].set_ylim(0, 1)
    axes[2].set_title(f"retrieval stand-in ({r1['queries']} queries)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path
