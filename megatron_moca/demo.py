"""`moca demo`: the pipeline on the embedded default, as the `moca` commands a user would type.

    1. moca data demo          real documents from pinned Debian packages -> stage-1 shards
    2. moca pretrain           MoCa stage 1 (MLM + MAE) on a tiny random Qwen2.5-VL, resumable
    3. moca convert mcore-to-hf   the stage-1 weights as a Hugging Face folder (MAE decoder dropped)
    4. moca convert verify     that folder against the checkpoint (last line: max_abs_diff=...)
    5. moca data standin + moca eval --task retrieval   a text -> image retrieval stand-in from demo pages
                               (plus training pairs of other pages), evaluated on the stage-1 export
    6. moca finetune           MoCa stage 2 (InfoNCE + a hard negative) from the export on those pairs
    7. moca eval --task retrieval   the stage-2 release on the same held-out stand-in
    then results.md and results.png in the work directory (demo_report.py)

Each step runs in its own process (the CLI is the contract) and is skipped when its output is
already in the work directory, so an interrupted demo is rerun with the same command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

from megatron_moca.errors import UserError

# the embedded default: a tiny random model on the demo corpus, a couple of minutes on two CPU cores
DEMO_PRETRAIN = [
    "model.preset=tiny", "model.params_dtype=float32", "train.train_iters=30", "train.micro_batch_size=1",
    "train.global_batch_size=2", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.lr_warmup_iters=3",
    "optim.lr_decay_style=cosine", "checkpoint.save_interval=10", "logging.log_interval=5",
    "data.pack_length=1024", "data.pad_to_multiple=16", "sample.max_length=512",
    # 4..64 visual tokens per image keep the tiny run fast (MoCa: 256..1024)
    "sample.image.min_pixels=3136", "sample.image.max_pixels=50176",
]
# one epoch over 512 pairs of pages not in the evaluation stand-in, the same image sizes as stage 1
DEMO_FINETUNE = [
    "model.compute_dtype=float32", "train.global_batch_size=8", "train.train_iters=64", "optim.lr=3e-4",
    "checkpoint.save_interval=32", "logging.log_interval=8", "data.max_length=256",
    "data.image.min_pixels=3136", "data.image.max_pixels=50176", "objective.hard_negatives=1",
]
DEMO_EVAL = ["--max-length", "256", "--min-pixels", "3136", "--max-pixels", "50176"]


def _moca(args: List[str], log) -> subprocess.CompletedProcess:
    log("$ moca " + " ".join(args))
    # megatron/torch warn on every CPU run that TE/apex are absent and about deprecations: not news here
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_moca.cli", *args], text=True, stdout=subprocess.PIPE,
                          env=env)
    if proc.stdout:
        log(proc.stdout.rstrip())
    if proc.returncode != 0:
        raise UserError(f"demo step `moca {args[0]} {args[1] if len(args) > 1 else ''}` failed (exit "
                        f"{proc.returncode}, its message is above); rerun `moca demo` to continue from there")
    return proc


def _discard_interrupted(folder: str) -> None:
    """A step's output folder without its completion file is a build that was cut short: start over - only
    where the folder is ours (a user's folder of that name is refused, never deleted)."""
    from megatron_moca.ownership import remove_ours

    remove_ours(folder, "an unfinished demo step's output")


def _earlier_demo(workdir: str) -> bool:
    """A work directory of a release before folders were marked: its stage-1 run's tracker is there."""
    return os.path.isfile(os.path.join(workdir, "stage1", "latest_checkpointed_iteration.txt"))


def run_demo(workdir: str, log=print, pretrain_overrides: List[str] = (), finetune_overrides: List[str] = ()) -> dict:
    """Run (or continue) the demo in `workdir`; returns a summary of what was produced.
    pretrain_overrides / finetune_overrides: more `key=value` settings for stage 1 / stage 2 (after the
    embedded default)."""
    from megatron_moca.ownership import claim
    from megatron_moca.run_lock import exclusive

    workdir = os.path.abspath(workdir)
    claim(workdir, "moca demo", "--workdir", legacy=_earlier_demo)
    with exclusive(workdir, "moca demo"):
        return _run_steps(workdir, log, pretrain_overrides, finetune_overrides)


def _run_steps(workdir: str, log, pretrain_overrides, finetune_overrides) -> dict:
    from megatron_moca.checkpointing import read_tracker

    shards, stage1 = os.path.join(workdir, "shards"), os.path.join(workdir, "stage1")
    if os.path.isfile(os.path.join(shards, "manifest.json")):
        log(f"[1/7] demo shards: already in {shards}")
    else:
        log("[1/7] demo shards")
        _discard_interrupted(shards)
        _moca(["data", "demo", "--output", shards], log)
    log("[2/7] stage 1 (resumes from the latest checkpoint if there is one)")
    _moca(["pretrain", *DEMO_PRETRAIN, f"data.paths={shards}", f"checkpoint.save={stage1}", *pretrain_overrides], log)
    iteration = read_tracker(stage1)
    hf = os.path.join(workdir, f"hf_iter_{iteration:07d}")
    if os.path.isfile(os.path.join(hf, "config.json")):
        log(f"[3/7] Hugging Face export: already in {hf}")
    else:
        log("[3/7] Hugging Face export of the stage-1 weights")
        _moca(["convert", "mcore-to-hf", "--checkpoint", stage1, "--output", hf], log)
    log("[4/7] verify the export against the checkpoint")
    verified = _moca(["convert", "verify", "--hf", hf, "--checkpoint", stage1], log)
    log("[5/7] retrieval stand-in (each page's text -> its image) and the stage-1 export's score on it")
    standin = os.path.join(workdir, "retrieval_standin")
    pairs = os.path.join(standin, "train")
    if not os.path.isfile(os.path.join(pairs, "DemoPairs", "train.jsonl")):
        _discard_interrupted(standin)
        _moca(["data", "standin", "--input", shards, "--output", standin, "--max-queries", "64",
               "--train-pairs", "512"], log)
    before = _moca(["eval", "--model", hf, "--task", "retrieval", "--data", standin, *DEMO_EVAL], log)
    log("[6/7] stage 2: contrastive fine-tuning of the export on pairs of other pages (resumes if interrupted)")
    stage2 = os.path.join(workdir, f"stage2_from_iter_{iteration:07d}")
    _moca(["finetune", *DEMO_FINETUNE, f"model.path={hf}", f"data.paths={pairs}", f"checkpoint.save={stage2}",
           *finetune_overrides], log)
    log("[7/7] the stage-2 release on the same stand-in")
    release = os.path.join(stage2, "release")
    after = _moca(["eval", "--model", release, "--task", "retrieval", "--data", standin, *DEMO_EVAL], log)

    from megatron_moca.training.plot import read_metrics

    s1, s2 = read_metrics(stage1), read_metrics(stage2)
    keys1, keys2 = ("step", "loss", "mlm_loss", "mae_loss"), ("step", "loss", "accuracy")
    summary = {"workdir": workdir, "shards": shards, "stage1": stage1, "hf": hf, "iteration": iteration,
               "first": {k: s1[0][k] for k in keys1}, "last": {k: s1[-1][k] for k in keys1},
               "verify": verified.stdout.strip().splitlines()[-1],
               "stage2": stage2, "release": release,
               "stage2_first": {k: s2[0][k] for k in keys2}, "stage2_last": {k: s2[-1][k] for k in keys2},
               "retrieval": json.loads(before.stdout.strip().splitlines()[-1]),
               "retrieval_stage2": json.loads(after.stdout.strip().splitlines()[-1])}
    log(f"stage 1: loss {summary['first']['loss']:.3f} at step {summary['first']['step']} -> "
        f"{summary['last']['loss']:.3f} at step {summary['last']['step']}; export {hf}: {summary['verify']}")
    log(f"stage 2: loss {summary['stage2_first']['loss']:.3f} at step {summary['stage2_first']['step']} -> "
        f"{summary['stage2_last']['loss']:.3f} at step {summary['stage2_last']['step']}; release {release}")
    for name, r in (("stage-1 export", summary["retrieval"]), ("stage-2 release", summary["retrieval_stage2"])):
        log(f"retrieval stand-in, {name} ({r['queries']} queries, {r['documents']} images): nDCG@10 "
            f"{r['ndcg@10']:.3f}, recall@1 {r['recall@1']:.3f}, recall@10 {r['recall@10']:.3f} (chance: recall@1 "
            f"{1 / r['documents']:.3f}, recall@10 {min(1.0, 10 / r['documents']):.3f})")
    from megatron_moca.demo_report import write_results_md, write_results_png

    summary["results_md"] = write_results_md(summary, os.path.join(workdir, "results.md"))
    summary["results_png"] = write_results_png(summary, s1, s2, os.path.join(workdir, "results.png"))
    log(f"wrote {summary['results_md']} and {summary['results_png']}")
    return summary
