"""`moca data prepare` at scale: mistyped records and unbounded image files are skipped and counted;
no two inputs share a sample key; a prepare killed with SIGKILL resumes with the same command to the
bytes an uninterrupted run writes; two partitions merged hold the documents of one prepare of all inputs."""

import base64
import json
import os
import shutil


from helpers import assert_helpers_gone, kill_when, run_moca
from megatron_moca.data.documents import PLACEHOLDER
from megatron_moca.data.files import MAX_IMAGE_BYTES


def write_inputs(folder, real_images, files=3, per_file=60):
    """`files` JSONL inputs of text and image documents (images as files and inline base64)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted(real_images, key=os.path.getsize)[:6]
    (folder / "img").mkdir(exist_ok=True)
    for i, path in enumerate(images):
        shutil.copy(path, folder / "img" / f"p{i}{os.path.splitext(path)[1]}")
    names = sorted(os.listdir(folder / "img"))
    for f in range(files):
        with open(folder / f"part{f}.jsonl", "w") as out:
            for i in range(per_file):
                if i % 3 == 0:
                    record = {"text": f"file {f} document {i}: " + "words " * (20 + i % 7)}
                elif i % 3 == 1:
                    record = {"text": f"see {PLACEHOLDER} in file {f} doc {i}", "images": [f"img/{names[i % 6]}"]}
                else:
                    inline = base64.b64encode(open(folder / "img" / names[(i + 1) % 6], "rb").read()).decode()
                    record = {"texts": [f"obelics {f}/{i}", None], "images": [None, {"bytes": inline}]}
                out.write(json.dumps(record) + "\n")
    return str(folder)


def documents(folder):
    """key -> (segments, images, source) of every sample in a shard folder (its manifest's shards)."""
    from megatron_moca.data.shards import read_shard

    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    out = {}
    for shard in manifest["shards"]:
        for doc in read_shard(os.path.join(folder, shard["name"])):
            assert doc.key not in out
            out[doc.key] = (doc.segments, doc.images, doc.source)
    return out


def tree_bytes(folder):
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, names in os.walk(folder) for n in names}


def test_mistyped_records_and_unbounded_image_files_are_skipped_and_counted(tmp_path):
    src = tmp_path / "in"
    (src / "img").mkdir(parents=True)
    os.mkfifo(src / "img" / "fifo.png")
    os.symlink("/dev/zero", src / "img" / "zero.png")  # a device (a link out of the folder: read where allowed)
    with open(src / "img" / "huge.png", "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: refused from its size, never read
    rows = [{"text": "fine"}, {"text": "x", "images": 5}, {"texts": "not a list"}, {"text": 7},
            {"text": "m", "meta": [1]}, {"text": PLACEHOLDER, "images": ["img/fifo.png"]},
            {"text": PLACEHOLDER, "images": ["img/zero.png"]}, {"text": PLACEHOLDER, "images": ["img/huge.png"]},
            {"text": PLACEHOLDER, "images": [{"path": 3}]}, ["a", "list"]]
    (src / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_moca("data", "prepare", "--input", str(src), "--output", str(tmp_path / "out"), "--workers", "1",
                    "--allow-images-outside-root")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert manifest["totals"]["samples"] == 1
    assert manifest["skipped"] == {
        "'images' is not a list": 1, "'meta' is not an object": 1, "'texts' is not a list": 1,
        "'text' is not a string": 1, "image file not a regular file (a FIFO)": 1,
        "image file not a regular file (a device)": 1,
        f"image file larger than the limit ({MAX_IMAGE_BYTES} bytes)": 1,
        "unsupported image reference of type int": 1, "record is not a JSON object": 1}
    assert "prepare: 1 documents" in proc.stderr and "MB written" in proc.stderr and "9 skipped" in proc.stderr


def test_inputs_whose_names_differ_only_in_unsafe_characters_get_distinct_keys(tmp_path):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "x").mkdir()
    (src / "y").mkdir()
    names = ("a.b.jsonl", "a_b.jsonl", "a/b.jsonl", "a-b.jsonl", "x/docs.jsonl", "y/docs.jsonl")  # the last two:
    for name in names:                                                             # the same base name
        (src / name).write_text(json.dumps({"text": f"from {name}"}) + "\n")
    assert run_moca("data", "prepare", "--input", str(src), "--output", str(tmp_path / "out"),
                    "--workers", "1").returncode == 0
    docs = documents(str(tmp_path / "out"))
    assert len(docs) == 6 and sorted(seg[0][0] for seg in docs.values()) == sorted(f"from {n}" for n in names)


def test_a_killed_prepare_resumes_to_the_same_bytes(tmp_path, real_images):
    src = write_inputs(tmp_path / "in", real_images, files=2, per_file=150)
    args = ["data", "prepare", "--input", src, "--workers", "1", "--shard-mib", "0.25"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert run_moca(*args, "--output", straight).returncode == 0
    assert len(json.load(open(os.path.join(straight, "manifest.json")))["shards"]) >= 4

    def second_shard_done():
        return os.path.isfile(os.path.join(killed, "shard-000001.tar"))

    helpers = kill_when([*args, "--output", killed], second_shard_done)
    assert_helpers_gone(helpers)
    assert not os.path.isfile(os.path.join(killed, "manifest.json"))
    refused = run_moca(*args[:-1], "0.5", "--output", killed)  # other settings: not this job's folder
    assert refused.returncode == 2 and "holds the output of another prepare (max_shard_bytes differs" in refused.stderr
    rerun = run_moca(*args, "--output", killed)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert tree_bytes(killed) == tree_bytes(straight)
    again = run_moca(*args, "--output", killed)  # a complete job: returned as it is
    assert again.returncode == 0 and tree_bytes(killed) == tree_bytes(straight)


def test_partitions_merged_hold_the_documents_of_one_prepare(tmp_path, real_images):
    src = write_inputs(tmp_path / "in", real_images, files=3, per_file=12)
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert run_moca("data", "prepare", "--input", src, "--output", whole, "--workers", "1").returncode == 0
    first = run_moca("data", "prepare", "--input", src, "--output", parts, "--partition", "0/2", "--workers", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    early = run_moca("data", "merge", parts)
    assert early.returncode == 2 and "partition part-00001-of-00002 is missing or incomplete" in early.stderr
    assert run_moca("data", "prepare", "--input", src, "--output", parts, "--partition", "1/2",
                    "--workers", "1").returncode == 0
    merged = run_moca("data", "merge", parts)
    assert merged.returncode == 0 and "one manifest over 2 partitions" in merged.stdout, merged.stderr
    assert documents(parts) == documents(whole)
    manifest = json.load(open(os.path.join(parts, "manifest.json")))
    assert manifest["totals"] == json.load(open(os.path.join(whole, "manifest.json")))["totals"]
    # the order is pinned too: partition 0 (inputs 0 and 2) then partition 1 (input 1), each in input order
    part = [json.load(open(os.path.join(parts, f"part-0000{i}-of-00002", "manifest.json"))) for i in range(2)]
    assert part[0]["inputs"] == ["part0.jsonl", "part2.jsonl"] and part[1]["inputs"] == ["part1.jsonl"]
    assert manifest["inputs"] == part[0]["inputs"] + part[1]["inputs"]
    assert [s["name"] for s in manifest["shards"]] == \
        [f"part-0000{i}-of-00002/{s['name']}" for i in range(2) for s in part[i]["shards"]]
    whole_keys = list(documents(whole))
    by_input = {name: [k for k in whole_keys if k.startswith(name.replace(".jsonl", "-"))] for name in manifest["inputs"]}
    assert list(documents(parts)) == [k for name in manifest["inputs"] for k in by_input[name]]
    verify = run_moca("data", "verify", parts)  # the loader's checks accept the partitions' subfolders
    assert verify.returncode == 0, verify.stderr
    # the loader reads the merged dataset, and counts a bad sample inside a partition's shard
    import tarfile

    from megatron_moca.data.loader import LoaderConfig, Stage1Loader, stage1_builder_factory
    from megatron_moca.data.samples import Stage1SampleConfig

    victim = os.path.join(parts, "part-00000-of-00002", "shard-000000.tar")
    with tarfile.open(victim) as tar:
        start = next(m for m in tar.getmembers() if m.name.endswith(".json")).offset_data
    data = bytearray(open(victim, "rb").read())
    data[start:start + 2] = b"\xff\xff"
    open(victim, "wb").write(bytes(data))
    loader = Stage1Loader(LoaderConfig(paths=[parts], pack_length=2048, max_bad_sample_fraction=1.0),
                          stage1_builder_factory(None, Stage1SampleConfig(max_length=1024, image_pipeline="cpu")),
                          pad_id=151643, image_token_id=151655)
    rows = iter(loader)
    while loader.state_dict()["counts"][0] < len(documents(whole)) + 1:
        next(rows)
    assert loader.state_dict()["skipped"] == {"bad_json": 1}
    bad = run_moca("data", "prepare", "--input", src, "--output", parts, "--partition", "2/2")
    assert bad.returncode == 2 and "--partition 2/2: I must be within 0..N-1" in bad.stderr
