"""`moca data standin` + `moca eval --task retrieval` on a random tiny HF model: the stand-in pairs each
document's text with its own image, the last line is one JSON object of metrics; bad input exits 2."""

import json
import os

from helpers import run_moca, write_stage1_shards


def test_standin_then_eval_prints_metrics_last(tiny_hf_dir, tmp_path):
    shards = write_stage1_shards(tmp_path / "shards", documents=12)
    standin = str(tmp_path / "standin")
    proc = run_moca("data", "standin", "--input", shards, "--output", standin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    queries = [json.loads(line) for line in open(os.path.join(standin, "queries.jsonl"))]
    corpus = [json.loads(line) for line in open(os.path.join(standin, "corpus.jsonl"))]
    assert len(queries) == len(corpus) == 8  # the 8 of 12 documents that have an image
    assert all(os.path.isfile(os.path.join(standin, c["image"])) for c in corpus)
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "retrieval", "--data", standin, "--max-length", "120",
                    "--min-pixels", "3136", "--max-pixels", "12544")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == 8 and metrics["documents"] == 8 and metrics["task"] == "retrieval"
    assert 0 <= metrics["ndcg@5"] <= 1 and metrics["recall@10"] == 1.0  # 8 documents: all within the top 10
    again = run_moca("data", "standin", "--input", shards, "--output", standin)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_eval_refuses_what_it_cannot_do(tiny_hf_dir, tmp_path):
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "mmeb", "--data", str(tmp_path))
    assert proc.returncode == 2 and "--task mmeb is not built yet" in proc.stderr
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "retrieval", "--data", str(tmp_path))
    assert proc.returncode == 2 and "corpus.jsonl does not exist" in proc.stderr
