"""`moca demo` runs the pipeline's steps as CLI commands and continues where it stopped. The demo
corpus download is replaced by a shard folder already in place (tests/data covers `moca data demo`)."""

import os

from helpers import write_stage1_shards


def test_demo_runs_stage1_export_verify_and_reruns_without_redoing(tmp_path):
    from megatron_moca.demo import run_demo

    work = tmp_path / "demo"
    write_stage1_shards(work / "shards", documents=16)
    lines = []
    quick = ["train.train_iters=4", "checkpoint.save_interval=2", "logging.log_interval=2",
             "sample.max_length=100", "data.pack_length=128"]
    summary = run_demo(str(work), log=lines.append, pretrain_overrides=quick)
    assert "[1/5] demo shards: already in" in lines[0]
    assert summary["iteration"] == 4 and os.path.isfile(os.path.join(summary["hf"], "config.json"))
    assert float(summary["verify"].split("=")[1]) < 1e-4
    assert summary["first"]["step"] == 2 and summary["last"]["step"] == 4
    retrieval = summary["retrieval"]
    assert retrieval["task"] == "retrieval" and retrieval["queries"] == retrieval["documents"] > 0

    lines.clear()
    again = run_demo(str(work), log=lines.append, pretrain_overrides=quick)
    assert any("Hugging Face export: already in" in line for line in lines)
    assert again["last"] == summary["last"]  # stage 1 was complete: nothing retrained
