"""`moca pretrain` (stage 1) end to end on the CPU: the run-directory contract, a falling loss, exact
kill-and-resume, and TP=2 / PP=2 / DP=2 runs equal to one process (gloo, torchrun)."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, child_env, run_moca, write_stage1_shards

RECIPE = os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml")
SMALL = ["sample.max_length=100", "data.pack_length=128", "logging.log_interval=1"]
METRIC_KEYS = {"step", "loss", "mlm_loss", "mae_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu",
               "mem_gib", "data_wait_frac"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_stage1_shards(tmp_path_factory.mktemp("stage1") / "shards")


def pretrain_args(shards, save, *overrides):
    return ["pretrain", "--config", RECIPE, f"data.paths={shards}", f"checkpoint.save={save}", *SMALL, *overrides]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun_moca(nproc, *args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_moca.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=REPO)


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    """One process, 8 iterations, a checkpoint every 3 (and at the end)."""
    save = str(tmp_path_factory.mktemp("ref") / "run")
    proc = run_moca(*pretrain_args(shards, save, "train.train_iters=8", "checkpoint.save_interval=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save, proc


def test_run_directory_contract_and_falling_loss(reference_run):
    from megatron_moca.config.loading import build
    from megatron_moca.config.pretrain import PretrainConfig

    save, proc = reference_run
    expected = [".megatron_moca", "config.yaml", "iter_0000003", "iter_0000006", "iter_0000008",
                "latest_checkpointed_iteration.txt", "metrics.jsonl"] + \
        (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    assert sorted(os.listdir(save)) == expected
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "8"
    cfg = build(PretrainConfig, yaml.safe_load(open(os.path.join(save, "config.yaml"))))
    assert cfg.train.train_iters == 8 and cfg.model.language.num_layers == 4  # resolved: preset expanded
    records = metrics(save)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(METRIC_KEYS <= set(r) for r in records)
    first, last = records[0], records[-1]
    assert abs(first["loss"] - (first["mlm_loss"] + 0.5 * first["mae_loss"])) < 1e-9
    assert first["mae_loss"] > 0 and first["tflops_per_gpu"] > 0 and first["mfu"] is None  # no MFU on the CPU
    assert last["mlm_loss"] < first["mlm_loss"] - 0.3, [r["mlm_loss"] for r in records]
    assert records[1]["lr"] > records[0]["lr"] and last["lr"] < records[2]["lr"]  # warmup, then decay
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 8


def test_stage1_checkpoint_loads_as_a_model(reference_run):
    """The training checkpoint is a plain model checkpoint to the converter and load_model."""
    from megatron_moca.checkpointing import checkpoint_has_prefix, read_model_config, resolve_checkpoint

    save, _ = reference_run
    folder = resolve_checkpoint(save)
    assert folder.endswith("iter_0000008")
    assert read_model_config(folder).language.num_layers == 4
    assert checkpoint_has_prefix(folder, "mae_decoder.") and checkpoint_has_prefix(folder, "vision.blocks.")


def test_kill_and_resume_continues_exactly(reference_run, shards, tmp_path):
    """SIGKILL mid-run, rerun the same command: the losses equal those of the run that never stopped."""
    save = str(tmp_path / "run")
    args = pretrain_args(shards, save, "train.train_iters=8", "checkpoint.save_interval=3")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_moca.cli", *args], env=child_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = os.path.join(save, "metrics.jsonl")
        if os.path.isfile(path) and len(open(path).read().splitlines()) >= 4:  # checkpoint 3 is complete
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(metrics(save))
    assert 4 <= killed_at < 8
    resumed = run_moca(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    ref = metrics(reference_run[0])
    got = metrics(save)
    assert [r["step"] for r in got] == list(range(1, 9))  # the killed run's records past 3 were replaced
    for a, b in zip(ref, got):
        assert (a["loss"], a["mlm_loss"], a["mae_loss"], a["grad_norm"], a["lr"]) == \
            (b["loss"], b["mlm_loss"], b["mae_loss"], b["grad_norm"], b["lr"]), a["step"]


def test_exit_interval_saves_and_stops(shards, tmp_path):
    save = str(tmp_path / "run")
    proc = run_moca(*pretrain_args(shards, save, "train.train_iters=5", "train.exit_interval=2",
                                   "checkpoint.save_interval=100"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(save)] == [1, 2]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    # the schedule follows the config on resume (megatron would refuse a changed length): finished at 3
    proc = run_moca(*pretrain_args(shards, save, "train.train_iters=3", "checkpoint.save_interval=100"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(save)
    assert [r["step"] for r in records] == [1, 2, 3]


@pytest.mark.parametrize("bad, message", [
    (["optim.lr=fast"], "config key optim.lr: expected float"),
    (["train.micro_batch_size=2", "train.global_batch_size=3"], "global_batch_size=3 is not a multiple"),
    (["optim.betas=1"], "unknown config key(s) optim.betas"),
    (["model.language.num_query_groups=3"], "num_attention_heads must be divisible by num_query_groups"),
])
def test_bad_settings_fail_before_any_work(shards, tmp_path, bad, message):
    save = tmp_path / "run"
    proc = run_moca(*pretrain_args(shards, str(save), *bad))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not save.exists()


def test_resuming_with_another_model_or_data_is_refused_and_changes_nothing(reference_run, shards, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "latest_checkpointed_iteration.txt"):
        shutil.copy(os.path.join(reference_run[0], name), save / name)
    shutil.copytree(os.path.join(reference_run[0], "iter_0000008"), save / "iter_0000008")
    before = {name: (save / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    proc = run_moca(*pretrain_args(shards, str(save), "train.train_iters=9", "model.language.num_layers=2"))
    assert proc.returncode == 2 and "holds a run of another model (model.language differs)" in proc.stderr, \
        proc.stderr[-2000:]
    proc = run_moca(*pretrain_args(f"{shards},{shards}", str(save), "train.train_iters=9"))
    assert proc.returncode == 2 and "was trained with data.paths=[" in proc.stderr and \
        "checkpoint.allow_data_change=true" in proc.stderr, proc.stderr[-2000:]
    proc = run_moca(*pretrain_args(f"{shards},{shards}", str(save), "train.train_iters=9",
                                   "checkpoint.allow_data_change=true"))  # allowed: the loader still cannot map it
    assert proc.returncode == 2 and "the run read 1 data source(s), data.paths now names 2" in proc.stderr, \
        proc.stderr[-2000:]
    assert {name: (save / name).read_bytes() for name in before} == before


def test_a_diverging_run_stops_with_a_message_and_keeps_its_last_checkpoint(shards, tmp_path):
    save = tmp_path / "run"
    proc = run_moca(*pretrain_args(shards, str(save), "train.train_iters=5", "checkpoint.save_interval=1",
                                   "optim.lr=1e30", "optim.lr_warmup_iters=0"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"moca: error: non-finite (loss|gradient) \(.*\) at iteration (\d): the run stopped before "
                        r"applying it; the last good checkpoint is .*/iter_000000\d - lower optim.lr or check the data",
                        last), last
    stopped = int(re.search(r"at iteration (\d)", last).group(1))
    assert f"the last good checkpoint is {save}/iter_{stopped - 1:07d}" in last
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped - 1)
    export = run_moca("convert", "mcore-to-hf", "--checkpoint", str(save), "--output", str(tmp_path / "hf"))
    assert export.returncode == 0, export.stderr[-2000:]
    from megatron_moca.conversion.hf_io import SafetensorsReader

    weights = SafetensorsReader(str(tmp_path / "hf"))
    assert all(torch.isfinite(weights.get(k)).all() for k in weights.keys())  # no checkpoint holds NaN/Inf


def test_data_path_without_manifest_is_named(tmp_path):
    proc = run_moca(*pretrain_args(str(tmp_path), str(tmp_path / "run")))
    assert proc.returncode == 2 and f"{tmp_path} has no manifest.json" in proc.stderr


@pytest.fixture(scope="module")
def parallel_runs(shards, reference_run, tmp_path_factory):
    """From the reference run's iteration-3 weights, 3 more iterations at TP=1 (one process), TP=2,
    PP=2 and DP=2 (two processes each; DP=2 with the optimizer sharded over the two ranks)."""
    start = os.path.join(reference_run[0], "iter_0000003")
    root = tmp_path_factory.mktemp("parallel")
    common = ["train.train_iters=3", "checkpoint.save_interval=100", f"checkpoint.load={start}"]
    gbs4 = "train.global_batch_size=4"
    layouts = {"single": (1, []), "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
               "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]), "dp2": (2, []),
               # the loss is normalised per GLOBAL batch: rows per micro-batch must not matter
               "mbs2": (1, ["train.micro_batch_size=2"]), "gbs4": (1, [gbs4]),
               "gbs4_mbs2": (1, [gbs4, "train.micro_batch_size=2"]), "gbs4_dp2": (2, [gbs4])}
    out = {}
    for name, (nproc, extra) in layouts.items():
        save = str(root / name)
        if name == "dp2":  # stopped after iteration 2 and resumed: megatron's fully parallel save and load
            proc = torchrun_moca(nproc, *pretrain_args(shards, save, *common, *extra, "train.exit_interval=2"))
            assert proc.returncode == 0, (name, proc.stderr[-3000:])
        proc = torchrun_moca(nproc, *pretrain_args(shards, save, *common, *extra))
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert name != "dp2" or "resumed from" in proc.stderr
        out[name] = metrics(save)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout, reference", [("tp2", "single"), ("pp2", "single"), ("dp2", "single"),
                                               ("mbs2", "single"), ("gbs4_mbs2", "gbs4"), ("gbs4_dp2", "gbs4")])
def test_parallel_layouts_train_like_one_process(parallel_runs, layout, reference):
    """Step 1 (same weights, same global batch): losses within 1e-6, the gradient norm (a sum of squares
    over every parameter, in another order per layout) within 5e-5. Later steps follow AdamW updates,
    which divide by the root of tiny second moments and so magnify last-bit differences: 1e-4.
    mbs2 / gbs4_mbs2: two rows per micro-batch; gbs4_dp2: two ranks with two micro-batches each - all the
    same global batch as their one-row-per-micro-batch reference."""
    ref, got = parallel_runs[reference], parallel_runs[layout]
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got):
        for key in ("loss", "mlm_loss", "mae_loss", "grad_norm"):
            bound = (5e-5 if key == "grad_norm" else 1e-6) if a["step"] == 1 else 1e-4
            assert abs(a[key] - b[key]) <= bound * abs(a[key]), (layout, a["step"], key, a[key], b[key])


def test_mae_weight_scales_the_mae_gradient_as_the_formula_says(shards, tmp_path):
    """loss = mlm + w * mae, so the first step's gradient is g_mlm + w g_mae and its squared norm a
    quadratic in w: |g|^2 = A + 2Bw + Cw^2. Four weights: the norms must differ (a trainer that ignores
    objective.mae_weight logs one norm four times - its logged loss is rebuilt from the config and would
    hide it) and the fourth must follow from the other three."""
    norms, parts = {}, set()
    for w in (0.5, 1.0, 2.0, 4.0):
        save = str(tmp_path / f"w{w}")
        proc = run_moca(*pretrain_args(shards, save, "train.train_iters=1", "optim.lr_warmup_iters=0",
                                       f"objective.mae_weight={w}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = metrics(save)[0]
        norms[w] = record["grad_norm"]
        parts.add((record["mlm_loss"], record["mae_loss"]))
    assert len(parts) == 1  # the same weights and batch: only the weighting differs
    assert abs(norms[4.0] - norms[0.5]) > 1e-3 * norms[0.5], norms
    ws = (0.5, 1.0, 2.0)
    a, b, c = np.linalg.solve(np.array([[1, 2 * w, w * w] for w in ws]), np.array([norms[w] ** 2 for w in ws]))
    assert abs((a + 8 * b + 16 * c) ** 0.5 - norms[4.0]) <= 1e-5 * norms[4.0], (norms, a, b, c)
