"""Hand-made bad stage-2 pair tables and evaluation folders. Image paths stay inside their root (refused
naming the row, unless allowed); a row whose image is unusable is skipped and counted by reason before
the first step; a broken evaluation set is one line on stderr, no traceback and no metrics."""

import json
import os
import shutil

import pytest

from helpers import run_moca, write_pairs
from megatron_moca.data.pairs import PairsData, PairsDataConfig
from megatron_moca.errors import UserError


def image_rows(folder, images):
    """An ImagePairs subset: one row per image path given (as the positive), plus two good rows."""
    rows = [{"qry": f"caption {i}", "pos_text": "<|image_1|>", "pos_image_path": path}
            for i, path in enumerate(["images/p0.png", *images, "images/p1.png"])]
    with open(os.path.join(folder, "ImagePairs", "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture()
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs", text_rows=4, image_rows=2)


@pytest.mark.parametrize("path", ["/etc/hostname", "../outside.png", "images/../../outside.png", "images/link.png",
                                  "images/zero.png", "../pairs_sibling/p0.png"])
def test_image_paths_outside_the_root_are_refused_naming_the_row(path, pairs, tmp_path):
    (tmp_path / "outside.png").write_bytes(open(os.path.join(pairs, "images", "p0.png"), "rb").read())
    os.symlink(tmp_path / "outside.png", os.path.join(pairs, "images", "link.png"))  # confinement is by real path
    os.symlink("/dev/zero", os.path.join(pairs, "images", "zero.png"))
    sibling = tmp_path / "pairs_sibling"  # a folder whose name starts with the root's: still outside it
    sibling.mkdir()
    shutil.copy(os.path.join(pairs, "images", "p0.png"), sibling / "p0.png")
    image_rows(pairs, [path])
    with pytest.raises(UserError) as err:
        PairsData(PairsDataConfig(paths=[pairs]))
    assert str(err.value) == (f"{pairs}/ImagePairs/train.jsonl:2: image path {path!r} points outside {pairs} "
                              "(set data.allow_images_outside_root=true to allow paths outside it)")


def test_allow_images_outside_root_admits_them(pairs, tmp_path):
    (tmp_path / "outside.png").write_bytes(open(os.path.join(pairs, "images", "p0.png"), "rb").read())
    image_rows(pairs, ["../outside.png"])
    data = PairsData(PairsDataConfig(paths=[pairs], allow_images_outside_root=True))
    assert data.fingerprint()["ImagePairs"] == 3 and not data.skipped


def test_rows_with_unusable_images_are_skipped_and_counted(pairs):
    images = os.path.join(pairs, "images")
    os.mkfifo(os.path.join(images, "fifo.png"))  # opening it would block the reader forever
    os.symlink("/dev/zero", os.path.join(images, "zero.png"))  # endless (a link out: read only where allowed)
    with open(os.path.join(images, "big.png"), "wb") as f:
        f.write(open(os.path.join(images, "p0.png"), "rb").read() + b"\0" * 300_000)
    with open(os.path.join(images, "cut.png"), "wb") as f:
        f.write(open(os.path.join(images, "p0.png"), "rb").read()[:20])
    (open(os.path.join(images, "text.png"), "w")).write("not an image")
    image_rows(pairs, ["images/missing.png", "images/fifo.png", "images/zero.png", "images/big.png",
                       "images/cut.png", "images/text.png"])
    small = max(os.path.getsize(os.path.join(images, f"p{i}.png")) for i in range(2))
    data = PairsData(PairsDataConfig(paths=[pairs], max_image_bytes=small + 1000, allow_images_outside_root=True))
    assert data.fingerprint() == {"ImagePairs": 2, "TextPairs": 4}
    assert data.skipped == {"image missing": 1, "image not a regular file": 2, "image larger than the limit": 1,
                            "image undecodable": 2}


def test_a_subset_left_empty_is_an_error_naming_it(pairs):
    with open(os.path.join(pairs, "ImagePairs", "train.jsonl"), "w") as f:
        f.write(json.dumps({"qry": "q", "pos_text": "<|image_1|>", "pos_image_path": "img/nope.png"}) + "\n")
    with pytest.raises(UserError, match="subset ImagePairs: every row was skipped for an unusable image "
                                        r"\(1 image missing\); check data.image_root"):
        PairsData(PairsDataConfig(paths=[pairs]))


def test_finetune_reports_skipped_rows_and_trains(tiny_hf_dir, pairs, tmp_path):
    image_rows(pairs, ["images/missing.png"])
    proc = run_moca("finetune", f"model.path={tiny_hf_dir}", f"data.paths={pairs}", f"checkpoint.save={tmp_path / 'run'}",
                    "model.compute_dtype=float32", "train.global_batch_size=2", "data.max_length=96",
                    "data.num_workers=0", "data.image.min_pixels=3136", "data.image.max_pixels=6272",
                    "train.train_iters=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 2: 6 pairs in 2 subsets" in proc.stderr and "(skipped 1 rows: 1 image missing)" in proc.stderr


def beir(folder, corpus, queries, qrels, prompts=None):
    from megatron_moca.eval.beir import write_beir

    write_beir(str(folder), corpus, queries, qrels)
    if prompts is not None:
        (folder / "moca_prompts.json").write_text(prompts)
    return str(folder)


GOOD_CORPUS = [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}]
GOOD_QUERIES = [{"_id": "q1", "text": "first"}]
EVAL_CASES = {
    "duplicate_doc_id": (GOOD_CORPUS + [{"_id": "d1", "text": "again"}], GOOD_QUERIES, ["q1\td1\t1"], None,
                         "corpus.jsonl:3: id 'd1' again (first at line 1); ids must be unique"),
    "duplicate_query_id": (GOOD_CORPUS, GOOD_QUERIES * 2, ["q1\td1\t1"], None,
                           "queries.jsonl:2: id 'q1' again (first at line 1)"),
    "unknown_query": (GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1", "q9\td2\t1"], None,
                      "judge query ids that the queries lack, e.g. ['q9']"),
    "zero_judged": (GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t0"], None,
                    "judge no query relevant to any document: nothing to score"),
    "template_field": (GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1"], '{"query": "Q: {text} in {language}"}',
                       "moca_prompts.json: query: unknown field(s) ['language'] in 'Q: {text} in {language}'"),
    "template_brace": (GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1"], '{"query": "Q: {text"}',
                       "moca_prompts.json: query: not a valid template"),
    "prompts_not_json": (GOOD_CORPUS, GOOD_QUERIES, ["q1\td1\t1"], '{"query": ', "moca_prompts.json: not valid JSON"),
    "image_outside": ([{"_id": "d1", "image": "/etc/passwd"}], GOOD_QUERIES, ["q1\td1\t1"], None,
                      "corpus.jsonl:1: image path '/etc/passwd' points outside"),
}


def assert_one_line_error(proc, message):
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("moca: error: ") and message in lines[-1], lines[-1]


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_a_broken_retrieval_set_is_one_line_and_no_metrics(case, tiny_hf_dir, tmp_path):
    corpus, queries, qrels, prompts, message = EVAL_CASES[case]
    data = beir(tmp_path / "set", corpus, queries, qrels, prompts)
    assert_one_line_error(run_moca("eval", "--model", tiny_hf_dir, "--task", "retrieval", "--data", data), message)


@pytest.mark.parametrize("rows, message", [
    ([], "MMEB subset Empty: its tables (test.jsonl) have no rows"),
    ([{"qry_text": "q", "tgt_text": "a string", "tgt_img_path": ["x"]}], "must be non-empty lists of equal length"),
    ([{"qry_text": 3, "tgt_text": ["a"], "tgt_img_path": [""]}], "qry_text and tgt_text entries must be strings"),
    ([{"qry_text": "q", "tgt_text": ["a"], "tgt_img_path": ["../../x.png"]}], "image path '../../x.png' points outside"),
    ([{"qry_text": "q", "tgt_text": ["a"], "tgt_img_path": ["gone.png"]}], "MMEB image gone.png under"),
])
def test_a_broken_mmeb_set_is_one_line_and_no_metrics(rows, message, tiny_hf_dir, tmp_path):
    subset = tmp_path / "mmeb" / "Empty"
    subset.mkdir(parents=True)
    (subset / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_moca("eval", "--model", tiny_hf_dir, "--task", "mmeb", "--data", str(tmp_path / "mmeb"))
    assert_one_line_error(proc, message)
