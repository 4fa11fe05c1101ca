"""`moca demo` runs the pipeline's steps as CLI commands (stage 1, export, verify, stand-in eval, stage 2,
eval) and continues where it stopped. The demo corpus download is replaced by a shard folder already in
place (tests/data covers `moca data demo`)."""

import os

from helpers import write_stage1_shards


def test_demo_runs_both_stages_and_reruns_without_redoing(tmp_path):
    from megatron_moca.demo import run_demo

    from megatron_moca.ownership import mark

    work = tmp_path / "demo"
    write_stage1_shards(work / "shards", documents=16)  # as if the demo's first step had run (no download here)
    mark(str(work), "moca demo")
    mark(str(work / "shards"), "moca data demo")
    lines = []
    quick = ["train.train_iters=4", "checkpoint.save_interval=2", "logging.log_interval=2",
             "sample.max_length=100", "data.pack_length=128"]
    quick2 = ["train.train_iters=3", "train.global_batch_size=4", "checkpoint.save_interval=2", "data.max_length=128"]
    summary = run_demo(str(work), log=lines.append, pretrain_overrides=quick, finetune_overrides=quick2)
    assert "[1/7] demo shards: already in" in lines[0]
    assert summary["iteration"] == 4 and os.path.isfile(os.path.join(summary["hf"], "config.json"))
    assert float(summary["verify"].split("=")[1]) < 1e-4
    assert summary["first"]["step"] == 2 and summary["last"]["step"] == 4
    retrieval = summary["retrieval"]
    assert retrieval["task"] == "retrieval" and retrieval["queries"] == retrieval["documents"] > 0
    # 10 of the 16 documents have an image: 5 for the stand-in, the other 5 are training pairs
    assert retrieval["documents"] == 5 and summary["retrieval_stage2"]["documents"] == 5
    assert summary["stage2_last"]["step"] == 3 and os.path.isfile(os.path.join(summary["release"], "config.json"))
    # what the demo leaves to look at: a results table and a picture
    results = (work / "results.md").read_text()
    assert "| chance | 0.200 | 1.000 |" in results  # 5 documents: recall@1 1/5, recall@10 1
    assert f"| stage-1 export | {retrieval['recall@1']:.3f} | {retrieval['recall@10']:.3f} |" in results
    assert f"{summary['stage2_last']['loss']:.4f}" in results and summary["verify"] in results
    from PIL import Image

    with Image.open(work / "results.png") as picture:
        assert picture.size == (1300, 360) and len(set(picture.convert("L").getdata())) > 10  # drawn, not blank

    lines.clear()
    again = run_demo(str(work), log=lines.append, pretrain_overrides=quick, finetune_overrides=quick2)
    assert any("Hugging Face export: already in" in line for line in lines)
    assert again["last"] == summary["last"]  # stage 1 was complete: nothing retrained
    assert again["stage2_last"] == summary["stage2_last"]  # nor stage 2


def test_moca_demo_prints_its_summary_as_the_last_line(monkeypatch, capsys, tmp_path):
    import json

    from megatron_moca import cli, demo

    summary = {"workdir": str(tmp_path), "retrieval": {"ndcg@10": 0.5}}
    monkeypatch.setattr(demo, "run_demo", lambda workdir, log: log("a progress line") or summary)
    assert cli.main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "a progress line" and json.loads(out[-1]) == summary
