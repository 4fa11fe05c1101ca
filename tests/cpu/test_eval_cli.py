"""`moca data standin` + `moca eval --task retrieval` on a random tiny HF model: the stand-in pairs each
document's text with its own image, the last line is one JSON object of metrics; bad input exits 2."""

import json
import os

import pytest

from helpers import REPO, run_moca, run_torchrun, trec_eval_means, write_stage1_shards


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
                    "--min-pixels", "3136", "--max-pixels", "12544", "--output", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == 8 and metrics["documents"] == 8 and metrics["task"] == "retrieval"
    assert metrics["recall@10"] == 1.0  # 8 documents: all within the top 10
    theirs = trec_eval_means(tmp_path / "results" / "run.trec", os.path.join(standin, "qrels", "test.tsv"), ndcg=5)
    assert theirs == {"ndcg@5": pytest.approx(metrics["ndcg@5"], abs=1e-6), "queries": 8}
    # torchrun: each of 2 ranks embeds half the inputs, rank 0 reports the one-process numbers
    proc = run_torchrun(2, os.path.join(REPO, "megatron_moca", "cli.py"), "eval", "--model", tiny_hf_dir, "--task",
                        "retrieval", "--data", standin, "--max-length", "120", "--min-pixels", "3136",
                        "--max-pixels", "12544")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "embedding over 2 ranks" in proc.stdout and proc.stdout.count('"task"') == 1  # one report
    assert sharded.keys() == metrics.keys()
    for key, value in metrics.items():
        assert sharded[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key
    with open(os.path.join(standin, "mine.txt"), "w") as f:  # a user's file in the stand-in folder
        f.write("mine")
    again = run_moca("data", "standin", "--input", shards, "--output", standin)
    assert again.returncode == 2 and "holds 'mine.txt', which megatron_moca did not write there" in again.stderr
    assert open(os.path.join(standin, "mine.txt")).read() == "mine"


def test_standin_training_pairs_are_other_documents_in_the_mmeb_train_layout(tmp_path):
    from megatron_moca.data.pairs import PairsData, PairsDataConfig

    shards = write_stage1_shards(tmp_path / "shards", documents=12)  # 8 with an image
    standin = str(tmp_path / "standin")
    proc = run_moca("data", "standin", "--input", shards, "--output", standin, "--max-queries", "100",
                    "--train-pairs", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 queries / 4 images" in proc.stdout and "4 training pairs" in proc.stdout  # half left for training
    evaluated = {json.loads(line)["source_key"] for line in open(os.path.join(standin, "corpus.jsonl"))}
    rows = [json.loads(line) for line in open(os.path.join(standin, "train", "DemoPairs", "train.jsonl"))]
    assert not evaluated & {r["source_key"] for r in rows} and len(evaluated) == 4
    data = PairsData(PairsDataConfig(paths=[os.path.join(standin, "train")]))
    assert data.fingerprint() == {"DemoPairs": 4}
    assert all(p.positive[1] and len(p.negatives) == 1 and p.negatives[0][1] != p.positive[1] for p in data.pairs)


def write_mmeb(root):
    """Two subsets in the MMEB-eval layout; where the positive (candidate 0) is the query itself it must
    rank first, where the query's twin is another candidate the row must miss."""
    import pytest
    from PIL import Image

    pa = pytest.importorskip("pyarrow")  # the dev extra installs it (CI); parquet reading needs it
    import pyarrow.parquet as pq

    images = root / "eval_images" / "SetA"
    images.mkdir(parents=True)
    for i, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        Image.new("RGB", (60, 40 + 20 * i), colour).save(images / f"{i}.png")
    query = "<|image_1|> Represent the given image with the following question: what colour?"
    rows = [{"qry_text": query, "qry_img_path": "SetA/0.png",
             "tgt_text": [query, "a red square", "<|image_1|> Represent the given image."],
             "tgt_img_path": ["SetA/0.png", "", "SetA/1.png"]}]
    (root / "SetA").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "SetA" / "test-00000-of-00001.parquet")
    (root / "SetB").mkdir()
    (root / "SetB" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"qry_text": "Find a caption: a harbour", "qry_img_path": "",
         "tgt_text": ["Find a caption: a harbour", "<|image_1|> a harbour photo"], "tgt_img_path": ["", ""]},
        # here the query's twin is candidate 1, not the positive: a miss (a constant embedding would tie -> hit)
        {"qry_text": "Find a caption: a harbour", "qry_img_path": "",
         "tgt_text": ["a mountain at noon", "Find a caption: a harbour"], "tgt_img_path": ["", ""]}]))


def test_mmeb_hit_at_1_per_subset(tiny_hf_dir, tmp_path):
    write_mmeb(tmp_path)
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "mmeb", "--data", str(tmp_path), "--max-length", "200",
                    "--min-pixels", "3136", "--max-pixels", "12544")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    from megatron_moca.eval.mmeb import MMEB_PROMPTS
    assert metrics == {"task": "mmeb", "overall": 0.75, "subsets": {"SetA": 1.0, "SetB": 0.5}, "prompts": MMEB_PROMPTS}
    assert "SetA: hit@1 1.0000 over 1 rows" in proc.stdout


def test_eval_refuses_what_it_cannot_do(tiny_hf_dir, tmp_path):
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "mmeb", "--data", str(tmp_path))
    assert proc.returncode == 2 and "no MMEB subset folders" in proc.stderr
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "retrieval", "--data", str(tmp_path))
    assert proc.returncode == 2 and "corpus.jsonl does not exist" in proc.stderr


def test_eval_prints_the_exact_metrics_of_a_known_ranking(tiny_hf_dir, tmp_path):
    """Whatever the (random) model: d1 and d2 have q1's very text, so they tie at the top (cosine 1) and
    trec_eval's tie order puts d2 (the larger id) first, d1 second; the corpus has 4 documents, all in
    the top 5. q1 judges d1 (grade 2) and d4; q2 is judged only 0 and counts with 0."""
    from megatron_moca.eval.beir import write_beir

    data = str(tmp_path / "set")
    write_beir(data, [{"_id": "d1", "text": "alpha beta gamma"}, {"_id": "d2", "text": "alpha beta gamma"},
                      {"_id": "d3", "text": "a completely different sentence"},
                      {"_id": "d4", "text": "numbers 7 8 9 and more"}],
               [{"_id": "q1", "text": "alpha beta gamma"}, {"_id": "q2", "text": "zeta"}],
               ["q1\td1\t2", "q1\td4\t1", "q2\td3\t0"])
    out = tmp_path / "results"
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "retrieval", "--data", data, "--max-length", "64",
                    "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((out / "results.json").read_text()) == m
    per_query = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert [q["query_id"] for q in per_query] == ["q1", "q2"] and per_query[0]["mrr@5"] == 0.5
    run = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert [r[:4] for r in run[:2]] == [["q1", "Q0", "d2", "1"], ["q1", "Q0", "d1", "2"]] and len(run) == 8
    assert all(r[5] == "tiny" and float(r[4]) <= float(p[4]) for p, r in zip(run, run[1:]) if p[0] == r[0])
    import pytrec_eval  # trec_eval reads the run file and agrees with the printed metrics

    trec = {}
    for qid, _, doc, _, score, _ in run:
        trec.setdefault(qid, {})[doc] = float(score)
    theirs = pytrec_eval.RelevanceEvaluator({"q1": {"d1": 2, "d4": 1}, "q2": {"d3": 0}},
                                            {"recall.5", "ndcg_cut.10"}).evaluate(trec)
    assert sum(v["recall_5"] for v in theirs.values()) / 2 == m["recall@5"]
    assert abs(sum(v["ndcg_cut_10"] for v in theirs.values()) / 2 - m["ndcg@10"]) < 1e-12
    assert "| recall@5 | 0.5000 |" in (out / "results.md").read_text()
    assert m["queries"] == 2 and m["documents"] == 4
    assert (m["recall@1"], m["ndcg@1"], m["mrr@1"]) == (0.0, 0.0, 0.0)  # d2 first: not judged relevant
    assert m["mrr@5"] == 0.25 and m["mrr@10"] == 0.25  # q1: d1 at rank 2 -> 1/2; q2: 0
    assert m["recall@5"] == 0.5 and m["recall@10"] == 0.5  # q1 finds both; q2 has nothing relevant


def test_a_folder_of_sets_is_evaluated_set_by_set_with_the_means(tiny_hf_dir, tmp_path):
    """--task vidore over a folder holding BEIR sets (as ViDoRe-v2's sets sit side by side): each set's
    metrics, their mean (ViDoRe's summary: mean nDCG@5), query ids prefixed by the set in the files."""
    from megatron_moca.eval.beir import write_beir

    root = tmp_path / "vidore"
    write_beir(str(root / "a"), [{"_id": "d1", "text": "alpha beta gamma"}, {"_id": "d2", "text": "alpha beta gamma"},
                                 {"_id": "d3", "text": "a completely different sentence"}],
               [{"_id": "q1", "text": "alpha beta gamma"}], ["q1\td1\t1"])  # d2 ties d1 and wins the tie: rank 2
    write_beir(str(root / "b"), [{"_id": "x", "text": "one two three four"}, {"_id": "y", "text": "zzz"}],
               [{"_id": "q1", "text": "one two three four"}], ["q1\tx\t1"])  # its very text: rank 1
    (root / "notes").mkdir()  # not a set: ignored
    out = tmp_path / "out"
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "vidore", "--data", str(root), "--max-length", "64",
                    "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(m["sets"]) == ["a", "b"] and m["set_count"] == 2 and "2 sets in" in proc.stdout
    assert m["sets"]["a"]["mrr@5"] == 0.5 and m["sets"]["b"]["mrr@5"] == 1.0
    assert m["ndcg@5"] == (m["sets"]["a"]["ndcg@5"] + m["sets"]["b"]["ndcg@5"]) / 2 and m["mrr@5"] == 0.75
    assert [json.loads(line)["query_id"] for line in (out / "per_query.jsonl").read_text().splitlines()] == \
        ["a/q1", "b/q1"]
    assert {line.split()[0] for line in (out / "run.trec").read_text().splitlines()} == {"a/q1", "b/q1"}
    assert "| sets/a/ndcg@5 |" in (out / "results.md").read_text()
