"""Held-out evaluation sets from pinned packages: Tux Paint stamps (captions -> images, fetched with apt-get
in CI, ~160 MB), its stamp rules on a hand-made tree, and `moca eval` with the prompts the set names."""

import json
import os
import shutil

import pytest

from helpers import run_moca, trec_eval_means
from megatron_moca.eval.tuxpaint import stamp_pairs

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not on this machine")


def test_stamp_rules(tmp_path):
    def stamp(rel, caption, *exts):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if caption is not None:
            path.with_suffix(".txt").write_text(f"{caption}\nfr.utf8=Une traduction.\n")
        for ext in exts:
            path.with_suffix(ext).write_bytes(b"image")

    stamp("animals/frog", "A frog.", ".png", ".svg")  # PNG preferred
    stamp("space/moon", "The Moon.", ".svg")
    stamp("symbols/alphabets/asl/a", "The letter A.", ".png")  # alphabet letters are left out
    stamp("food/apple", None, ".png")  # no caption file: not a stamp pair
    stamp("food/pear", "A pear.")  # caption without an image
    assert [(os.path.relpath(p, tmp_path), c) for p, c in stamp_pairs(str(tmp_path))] == [
        ("animals/frog.png", "A frog."), ("space/moon.svg", "The Moon.")]


@needs_apt
def test_tuxpaint_set_has_the_documented_counts_and_evaluates(tiny_hf_dir, tmp_path_factory):
    cache = os.environ.get("MOCA_DEMO_CACHE") or str(tmp_path_factory.mktemp("debian"))
    out = str(tmp_path_factory.mktemp("evalsets") / "tuxpaint")
    proc = run_moca("data", "evalset", "--name", "tuxpaint", "--output", out, "--cache", cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(os.path.join(out, "evalset.json")))
    # spec data-sources.md: 792 pairs (627 PNG + 165 SVG), 707 unique captions
    assert (summary["queries"], summary["documents"]) == (707, 792), summary
    qrels = [line.split("\t")[0] for line in open(os.path.join(out, "qrels", "test.tsv")).read().split("\n")[1:] if line]
    shared = {q for q in qrels if qrels.count(q) > 1}
    assert len(qrels) == 792 and len(shared) == 71  # captions of several stamps: several positives
    with open(os.path.join(out, "notes.txt"), "w") as f:  # a file of the user's in the set's folder
        f.write("mine")
    again = run_moca("data", "evalset", "--name", "tuxpaint", "--output", out, "--cache", cache)
    assert again.returncode == 2 and "holds 'notes.txt', which megatron_moca did not write there" in again.stderr
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    results = tmp_path_factory.mktemp("results") / "tuxpaint"
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "retrieval", "--data", out, "--max-length", "64",
                    "--min-pixels", "3136", "--max-pixels", "3136", "--batch-size", "64", "--output", str(results))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == 707 and metrics["documents"] == 792
    # trec_eval on the run file (top 100 of 792) and the set's qrels (several positives per caption) agrees
    theirs = trec_eval_means(results / "run.trec", os.path.join(out, "qrels", "test.tsv"), ndcg=10, recall=10)
    assert theirs == {"ndcg@10": pytest.approx(metrics["ndcg@10"], abs=1e-6),
                      "recall@10": pytest.approx(metrics["recall@10"], abs=1e-6), "queries": 707}


def test_outline_sections_run_to_the_next_entry_at_their_level():
    from megatron_moca.eval.mini_vidore import outline_sections

    entries = [(0, "1 Intro", 0), (1, "1.1 Setup", 1), (1, "1.2 Use", 1), (0, "2 Long chapter", 3),
               (0, "3 End", 12), (0, "1 Intro", 13), (0, "", 13)]
    assert outline_sections(entries, pages=14) == [
        ("1 Intro", [0, 1, 2]),  # up to the page before chapter 2, subsections included
        ("1.1 Setup", [1]),  # the next entry starts on the same page: its first page only
        ("1.2 Use", [1, 2]),
        ("2 Long chapter", [3, 4, 5, 6, 7]),  # at most 5 pages
        ("3 End", [12]),  # a repeated title keeps its first section; an empty one is dropped
    ]


@needs_apt
def test_mini_vidore_has_every_manual_page_and_its_outline(tmp_path_factory):
    cache = os.environ.get("MOCA_DEMO_CACHE") or str(tmp_path_factory.mktemp("debian"))
    out = str(tmp_path_factory.mktemp("evalsets") / "mini_vidore")
    proc = run_moca("data", "evalset", "--name", "mini_vidore", "--output", out, "--cache", cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(os.path.join(out, "evalset.json")))
    assert (summary["documents"], summary["queries"]) == (2149, 1972), summary  # spec: 2,149 pages
    from megatron_moca.eval.beir import read_beir

    data = read_beir(out, split="test")
    assert len(data.corpus) == 2149 and all(os.path.isfile(d.image) for d in data.corpus[:50])
    sizes = [len(relevant) for relevant in data.qrels.values()]
    assert len(sizes) == 1972 and 1 <= min(sizes) and max(sizes) == 5


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not on this machine")
def test_flags_set_scores_in_the_mmeb_harness(tiny_hf_dir, tmp_path_factory):
    cache = os.environ.get("MOCA_DEMO_CACHE") or str(tmp_path_factory.mktemp("npm"))
    out = str(tmp_path_factory.mktemp("evalsets") / "flags")
    proc = run_moca("data", "evalset", "--name", "flags", "--output", out, "--cache", cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "CountryFlags", "test.jsonl"))]
    assert len(rows) == 271 and all(len(r["tgt_text"]) == 271 for r in rows)
    assert {r["tgt_text"][0] for r in rows} == set(rows[0]["tgt_text"])  # every name is once the right one
    assert all(os.path.isfile(os.path.join(out, "eval_images", r["qry_img_path"])) for r in rows)
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "mmeb", "--data", out, "--max-length", "64",
                    "--min-pixels", "3136", "--max-pixels", "3136", "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    # hit@1 over the 271 rows (a whole number of hits); CountryFlags is not one of MMEB's 36 sets, so it
    # joins no meta-task or IND / OOD mean, and overall is that one subset's score
    hits = metrics["overall"] * 271
    assert metrics == {"task": "mmeb", "overall": metrics["overall"], "subsets": {"CountryFlags": metrics["overall"]},
                       "prompts": metrics["prompts"]}, metrics
    assert hits == pytest.approx(round(hits), abs=1e-9)
