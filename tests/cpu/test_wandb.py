"""logging.wandb_project: every metrics.jsonl record mirrored to a W&B run whose id follows the run
directory (a resume continues it); offline mode writes the run under <save>/wandb; refused up front when
wandb is not installed."""

import glob
import json
import os

import pytest

from helpers import read_metrics, run_moca, write_pairs

RUN = ["model.compute_dtype=float32", "train.global_batch_size=4", "data.max_length=128", "data.num_workers=0",
       "data.image.min_pixels=3136", "data.image.max_pixels=12544", "logging.log_interval=1", "train.train_iters=3",
       "checkpoint.save_interval=100", "logging.wandb_project=moca-tests"]

# a stand-in `wandb` package that writes what it is given, to check what the trainer sends
RECORDING_WANDB = '''
import json, os
_out = os.environ["WANDB_RECORD"]
def _write(kind, **kw):
    with open(_out, "a") as f:
        f.write(json.dumps({"call": kind, **kw}, default=str) + "\\n")
class _Run:
    def log(self, data, step=None):
        _write("log", data=data, step=step)
    def finish(self):
        _write("finish")
def init(**kw):
    _write("init", **kw)
    return _Run()
'''


def test_records_go_to_wandb_as_they_go_to_metrics_jsonl(tiny_hf_dir, tmp_path):
    stub = tmp_path / "stub" / "wandb"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(RECORDING_WANDB)
    record = tmp_path / "calls.jsonl"
    save = str(tmp_path / "run")
    pairs = write_pairs(tmp_path / "pairs")
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={save}", *RUN,
                    env={"PYTHONPATH": str(stub.parent), "WANDB_RECORD": str(record)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    init = calls[0]
    assert init["call"] == "init" and init["project"] == "moca-tests" and init["name"] == "run"
    assert init["dir"] == save and init["resume"] == "allow" and len(init["id"]) == 16
    assert json.loads(json.dumps(init["config"]))["optim"]["lr"] == 2e-5  # the resolved config
    logs = [c for c in calls if c["call"] == "log"]
    metrics = read_metrics(save)
    assert [c["step"] for c in logs] == [r["step"] for r in metrics] == [1, 2, 3]
    for call, r in zip(logs, metrics):
        assert call["data"]["train/loss"] == r["loss"] and call["data"]["train/lr"] == r["lr"]
    assert calls[-1]["call"] == "finish"


def test_offline_wandb_writes_the_run_into_the_run_directory(tiny_hf_dir, tmp_path):
    pytest.importorskip("wandb", reason="wandb is in the dev extra; this test checks the real library offline")
    save = str(tmp_path / "run")
    pairs = write_pairs(tmp_path / "pairs")
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={save}", *RUN,
                    env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = glob.glob(os.path.join(save, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_wandb_without_the_package_is_refused_before_anything_runs(monkeypatch):
    import importlib.util

    from megatron_moca.config.common import LoggingConfig
    from megatron_moca.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="wandb is not installed"):
        LoggingConfig(wandb_project="p").validate()
    LoggingConfig().validate()


def test_wandb_refusing_to_start_is_one_line(tmp_path):
    """wandb installed but not logged in raises its UsageError at init: the run stops there in one line, naming
    what to do, before any step (here a stand-in raising what wandb 0.31 raises)."""
    from megatron_moca.errors import UserError
    from megatron_moca.training.metrics import MetricsWriter

    stub = tmp_path / "stub" / "wandb"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("class UsageError(Exception):\n    pass\n"
                                      "def init(**kw):\n    raise UsageError('api_key not configured (no-tty). call "
                                      "wandb.login(key=[your_api_key])')\n")
    import sys

    sys.path.insert(0, str(tmp_path / "stub"))
    sys.modules.pop("wandb", None)
    try:
        with pytest.raises(UserError) as err:
            MetricsWriter(str(tmp_path / "run"), 0, wandb={"project": "p", "name": None, "config": {}})
    finally:
        sys.path.remove(str(tmp_path / "stub"))
        sys.modules.pop("wandb", None)
    assert str(err.value) == ("logging.wandb_project=p: W&B did not start (UsageError: api_key not configured (no-tty). "
                              "call wandb.login(key=[your_api_key])); run `wandb login`, set WANDB_API_KEY, or "
                              "WANDB_MODE=offline to write the run under checkpoint.save")
