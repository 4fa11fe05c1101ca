"""Nothing a user types deletes or replaces their files, and odd inputs end in one line (or a counted skip with a
stable reason), never a hang or a traceback. Every refusal here happens before any model is loaded."""

import json
import os
import shutil
import struct

import pytest

from helpers import run_moca, write_stage1_shards
from megatron_moca.data.documents import LONE_SURROGATE, PLACEHOLDER
from megatron_moca.ownership import MARKER


def tree_bytes(folder):
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(folder) for n in names}


def user_folder(path, name="notes.txt"):
    """A folder holding a file of the user's (what must survive every command below)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "w") as f:
        f.write("the user's own file\n")
    return str(path)


def one_line_error(proc, fragment):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("moca: error: "), proc.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    return lines[0]


def beir_set(folder, qrels="q1\td1\t1\n", query="a query", image=None):
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    doc = {"_id": "d1", "text": "a document"}
    if image is not None:
        doc["image"] = image
    with open(os.path.join(folder, "corpus.jsonl"), "w") as f:
        f.write(json.dumps(doc) + "\n")
    with open(os.path.join(folder, "queries.jsonl"), "w") as f:
        f.write(json.dumps({"_id": "q1", "text": query}) + "\n")
    with open(os.path.join(folder, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + qrels)
    return str(folder)


def test_eval_output_never_replaces_what_the_user_had(tmp_path):
    data = beir_set(str(tmp_path / "set"))
    before = tree_bytes(data)
    mine = user_folder(tmp_path / "mine")
    eval_to = ["eval", "--model", str(tmp_path / "no_model"), "--task", "retrieval", "--data", data, "--output"]
    one_line_error(run_moca(*eval_to, mine), f"--output {mine}: holds files megatron_moca did not write ('notes.txt')")
    one_line_error(run_moca(*eval_to, data), f"--output {data}: holds files megatron_moca did not write")
    one_line_error(run_moca(*eval_to, os.path.join(mine, "notes.txt")), "exists and is not a directory")
    assert tree_bytes(mine) == {"notes.txt": b"the user's own file\n"} and tree_bytes(data) == before
    assert sorted(os.listdir(tmp_path)) == ["mine", "set"]  # no staging folder, no lock file left beside them


def test_demo_workdir_with_a_user_shards_folder_is_refused_and_left_as_it_was(tmp_path):
    theirs = user_folder(tmp_path / "theirs" / "shards")
    proc = run_moca("demo", "--workdir", str(tmp_path / "theirs"))
    one_line_error(proc, f"--workdir {tmp_path / 'theirs'}: holds files megatron_moca did not write ('shards')")
    # a work directory of ours into which the user put a shards/ folder of their own
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MARKER).write_text(json.dumps({"written_by": "moca demo", "entries": None}))
    user_folder(ours / "shards")
    one_line_error(run_moca("demo", "--workdir", str(ours)),
                   f"{ours / 'shards'} (an unfinished demo step's output): exists and was not written by megatron_moca")
    assert tree_bytes(theirs) == tree_bytes(str(ours / "shards")) == {"notes.txt": b"the user's own file\n"}


def test_a_failed_standin_leaves_nothing_that_blocks_the_rerun_and_never_writes_over_user_files(tmp_path):
    text_only = write_stage1_shards(tmp_path / "text_only", documents=1)  # document 0 has no image
    out = str(tmp_path / "standin")
    one_line_error(run_moca("data", "standin", "--input", text_only, "--output", out), "no document with an image")
    assert sorted(os.listdir(tmp_path)) == ["text_only"]  # no output, staging folder or lock left
    shards = write_stage1_shards(tmp_path / "shards", documents=6)
    assert run_moca("data", "standin", "--input", shards, "--output", out).returncode == 0
    assert run_moca("data", "standin", "--input", shards, "--output", out).returncode == 0  # ours: replaced
    user_folder(out, "my_qrels_notes.txt")
    one_line_error(run_moca("data", "standin", "--input", shards, "--output", out),
                   "holds 'my_qrels_notes.txt', which megatron_moca did not write there")
    assert os.path.isfile(os.path.join(out, "my_qrels_notes.txt")) and os.path.isfile(os.path.join(out, "corpus.jsonl"))


def test_plot_writes_exactly_the_named_png_and_never_over_a_user_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "grad_norm": None}) + "\n"
                                               for s in (1, 2, 3)))
    one_line_error(run_moca("plot", str(run), "--output", str(tmp_path / "pd")), "name a .png file")
    from PIL import Image

    theirs = str(tmp_path / "theirs.png")
    Image.new("RGB", (4, 4)).save(theirs)
    before = open(theirs, "rb").read()
    one_line_error(run_moca("plot", str(run), "--output", theirs), "exists and was not written by megatron_moca")
    assert open(theirs, "rb").read() == before
    ours = str(tmp_path / "curves.png")
    for _ in range(2):  # the second run replaces its own figure
        proc = run_moca("plot", str(run), "--output", ours)
        assert proc.returncode == 0 and proc.stdout.strip() == f"wrote {ours}", proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "run", "theirs.png"]


def test_evaluation_sets_with_odd_values_are_named_before_the_model_loads(tmp_path):
    model = str(tmp_path / "no_model")  # never reached: every set below is refused first
    args = ["eval", "--model", model, "--task", "retrieval", "--data"]
    one_line_error(run_moca(*args, beir_set(str(tmp_path / "inf"), qrels="q1\td1\tinf\n")),
                   "qrels/test.tsv:2: score 'inf' is not a finite number")
    one_line_error(run_moca(*args, beir_set(str(tmp_path / "nan"), qrels="q1\td1\tnan\n")), "is not a finite number")
    one_line_error(run_moca(*args, beir_set(str(tmp_path / "surrogate"), query="caf\ud800")),
                   f"queries.jsonl:1: record 'q1': {LONE_SURROGATE}")
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    with open(bomb / "big.png", "wb") as f:  # a valid PNG header claiming 60000 x 60000 pixels
        import zlib

        head = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
        f.write(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + head + struct.pack(">I", zlib.crc32(head)))
    one_line_error(run_moca(*args, beir_set(str(bomb), image="big.png")), "corpus.jsonl:1: image big.png under")


def test_prepare_refuses_blocking_or_self_reading_inputs_in_one_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    os.mkfifo(src / "b.jsonl")  # would block the reader forever
    proc = run_moca("data", "prepare", "--input", str(src), "--output", str(tmp_path / "out"), timeout=120)
    one_line_error(proc, f"--input {src}: b.jsonl: not a regular file (a FIFO); inputs must be regular files")
    one_line_error(run_moca("data", "prepare", "--input", str(src / "b.jsonl"), "--output", str(tmp_path / "out")),
                   "b.jsonl: not a regular file (a FIFO)")
    os.remove(src / "b.jsonl")
    one_line_error(run_moca("data", "prepare", "--input", str(src), "--output", str(src / "shards")),
                   f"--output {src / 'shards'} is inside --input {src}")
    assert sorted(os.listdir(tmp_path)) == ["in"] and sorted(os.listdir(src)) == ["a.jsonl"]


def test_prepare_skips_odd_records_with_stable_reasons_and_confines_image_paths(tmp_path, real_images):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(real_images[0], outside / "secret.png")
    src = tmp_path / "in"
    (src / "img").mkdir(parents=True)
    shutil.copy(real_images[1], src / "img" / "ok.png")
    os.symlink(outside / "secret.png", src / "img" / "link.png")  # a link out of the input folder
    (src / "img" / "bad1.png").write_bytes(b"not an image at all")
    (src / "img" / "bad2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [{"text": "fine text"}, {"text": "caf\ud800 scraped"}, {"texts": ["ok", "\udfff"]},
            {"text": f"ok {PLACEHOLDER}", "images": ["img/ok.png"]},
            {"text": f"x {PLACEHOLDER}", "images": ["img/bad1.png"]}, {"text": f"y {PLACEHOLDER}", "images": ["img/bad2.png"]},
            {"text": f"a {PLACEHOLDER}", "images": [str(outside / "secret.png")]},
            {"text": f"b {PLACEHOLDER}", "images": ["../outside/secret.png"]},
            {"text": f"c {PLACEHOLDER}", "images": ["img/link.png"]}]
    (src / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = [str(tmp_path / f"out{i}") for i in range(2)]
    for out in outputs:
        assert run_moca("data", "prepare", "--input", str(src), "--output", out, "--workers", "1").returncode == 0
    manifest = json.load(open(os.path.join(outputs[0], "manifest.json")))
    assert manifest["totals"]["samples"] == 2
    assert manifest["skipped"] == {
        "image path outside the input folder (absolute, '..' or a symbolic link out)": 3,
        LONE_SURROGATE: 2, "undecodable image (UnidentifiedImageError)": 1, "undecodable image (OSError)": 1}
    # the same input gives the same manifest, byte for byte (no addresses, paths or times in the reasons)
    assert open(os.path.join(outputs[0], "manifest.json"), "rb").read() == \
        open(os.path.join(outputs[1], "manifest.json"), "rb").read()
    allowed = str(tmp_path / "allowed")
    assert run_moca("data", "prepare", "--input", str(src), "--output", allowed, "--workers", "1",
                    "--allow-images-outside-root").returncode == 0
    assert json.load(open(os.path.join(allowed, "manifest.json")))["totals"]["samples"] == 5


def test_merge_refuses_partitions_of_different_inputs_or_settings(tmp_path):
    for name in ("a", "b"):
        src = tmp_path / name
        src.mkdir()
        for i in range(2):
            (src / f"part{i}.jsonl").write_text(json.dumps({"text": f"{name} {i}"}) + "\n")
    out = str(tmp_path / "out")
    prepare = ["data", "prepare", "--output", out, "--workers", "1"]
    assert run_moca(*prepare, "--input", str(tmp_path / "a"), "--partition", "0/2").returncode == 0
    assert run_moca(*prepare, "--input", str(tmp_path / "b"), "--partition", "1/2").returncode == 0
    one_line_error(run_moca("data", "merge", out), "part-00001-of-00002 was prepared from other input files than "
                                                   "part-00000 (inputs_sha256 differs)")
    shutil.rmtree(os.path.join(out, "part-00001-of-00002"))
    assert run_moca(*prepare, "--input", str(tmp_path / "a"), "--partition", "1/2", "--shard-mib", "1").returncode == 0
    one_line_error(run_moca("data", "merge", out), "part-00001-of-00002 was prepared with other settings")
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_verify_names_a_truncated_index_and_readers_fall_back_to_scanning(tmp_path):
    from megatron_moca.data.shards import index_shard

    shards = write_stage1_shards(tmp_path / "shards", documents=5)
    shard = os.path.join(shards, "shard-000000.tar")
    offsets = index_shard(shard)
    with open(shard + ".idx", "r+b") as f:
        f.truncate(len(offsets) * 8 - 3)
    assert index_shard(shard) == offsets  # the tar is scanned instead
    proc = run_moca("data", "verify", shards)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{shard}: its .idx is cut short ({len(offsets) * 8 - 3} bytes, not whole 8-byte offsets)" in proc.stderr


def test_a_stage2_checkpoint_given_to_the_converter_is_named_for_what_it_is(tmp_path):
    run = tmp_path / "s2"
    folder = run / "iter_0000004"
    folder.mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    (folder / "trainer_state.json").write_text("{}")
    (folder / ".metadata").write_bytes(b"")
    one_line_error(run_moca("convert", "mcore-to-hf", "--checkpoint", str(run), "--output", str(tmp_path / "hf")),
                   f"{folder}: an FSDP stage-2 (moca finetune) checkpoint, not a megatron one")
