"""Shard format round trip, and `moca data prepare` on real images with every kind of bad input."""

import base64
import json
import os
import shutil
import struct
import tarfile
import zlib

from megatron_moca.cli import main
from megatron_moca.data.documents import PLACEHOLDER, Document
from megatron_moca.data.shards import ReadError, ShardWriter, read_shard


def test_round_trip_and_deterministic_bytes(tmp_path, real_images):
    docs = [Document(f"doc-{i}", ["text é", 0, "more", 1], [open(p, "rb").read() for p in real_images[i:i + 2]],
                     "src", {"i": i}) for i in range(3)]
    for run in ("a", "b"):
        writer = ShardWriter(str(tmp_path / run), max_shard_bytes=1)  # one document per shard
        for d in docs:
            writer.write(d)
        assert len(writer.close()) == 3
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tars = sorted(n for n in os.listdir(tmp_path / "a") if n.endswith(".tar"))
    back = [d for name in tars for d in read_shard(str(tmp_path / "a" / name))]
    assert [(d.key, d.segments, d.images, d.meta) for d in back] == [(d.key, d.segments, d.images, d.meta) for d in docs]


def test_truncated_and_unreadable_shards_become_errors(tmp_path, real_images):
    writer = ShardWriter(str(tmp_path))
    small = sorted(real_images, key=os.path.getsize)[:4]  # similar sizes: the cut lands after doc-0
    for i in range(4):
        writer.write(Document(f"doc-{i}", ["t", 0], [open(small[i], "rb").read()]))
    shard = str(tmp_path / writer.close()[0].name)
    data = open(shard, "rb").read()
    truncated = str(tmp_path / "truncated.tar")
    open(truncated, "wb").write(data[:len(data) // 2])
    items = list(read_shard(truncated))
    assert any(isinstance(x, Document) for x in items)
    assert isinstance(items[-1], ReadError) and "truncated" in items[-1].reason
    missing = list(read_shard(str(tmp_path / "nope.tar")))
    assert len(missing) == 1 and "unreadable shard" in missing[0].reason
    # a sample whose image member is gone
    broken = str(tmp_path / "broken.tar")
    with tarfile.open(shard) as src, tarfile.open(broken, "w") as dst:
        for m in src.getmembers():
            if m.name != "doc-1.img0." + m.name.rsplit(".", 1)[-1]:
                dst.addfile(m, src.extractfile(m))
    reasons = [(x.kind, x.reason) for x in read_shard(broken) if isinstance(x, ReadError)]
    assert reasons == [("image_index", "segment names image 0, which has no member")]


def _bomb_png():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * (1 + 30000) * 64)  # only 64 rows: a huge canvas, a tiny file
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_prepare_counts_every_bad_input(tmp_path, real_images, capsys):
    src = tmp_path / "in"
    (src / "img").mkdir(parents=True)
    for p in real_images[:4]:
        shutil.copy(p, src / "img")
    names = [os.path.basename(p) for p in real_images[:4]]
    jpg = open(next(p for p in real_images if p.endswith(".jpg")), "rb").read()
    (src / "img" / "truncated.jpg").write_bytes(jpg[:3000])
    png = open(next(p for p in real_images if p.endswith(".png")), "rb").read()
    (src / "img" / "truncated.png").write_bytes(png[:len(png) // 3])
    (src / "img" / "bomb.png").write_bytes(_bomb_png())
    good = [{"text": f"First {PLACEHOLDER} then {PLACEHOLDER} done.", "images": ["img/" + names[0], "img/" + names[1]]},
            {"texts": ["OBELICS form", None, "after"], "images": [None, "img/" + names[2], None]},
            {"text": "a text-only document"},
            {"text": f"inline {PLACEHOLDER}", "images": [{"bytes": base64.b64encode(png).decode()}]}]
    bad = [({"text": f"x {PLACEHOLDER}", "images": ["img/truncated.jpg"]}, "undecodable image"),
           ({"text": f"x {PLACEHOLDER}", "images": ["img/truncated.png"]}, "undecodable image"),
           ({"text": f"x {PLACEHOLDER}", "images": ["img/bomb.png"]}, "decompression bomb"),
           ({"text": f"x {PLACEHOLDER}", "images": [None]}, "image bytes missing for a placeholder"),
           ({"text": f"{PLACEHOLDER}{PLACEHOLDER}", "images": ["img/" + names[3]]}, "more image placeholders"),
           ({"text": ""}, "zero-length text"),
           ({"text": f"x {PLACEHOLDER}", "images": ["img/absent.png"]}, "image file missing")]
    with open(src / "docs.jsonl", "wb") as f:
        for rec in good[:2] + [b for b, _ in bad] + good[2:]:
            f.write(json.dumps(rec).encode() + b"\n")
        f.write(b"\xff\xfe not utf-8\n{broken json\n")
    out = tmp_path / "out"
    assert main(["data", "prepare", "--input", str(src), "--output", str(out), "--workers", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 4
    skipped = manifest["skipped"]
    assert sum(skipped.values()) == len(bad) + 2
    for _, reason in bad:
        assert any(reason in k for k in skipped), (reason, skipped)
    assert skipped["invalid UTF-8"] == 1 and skipped["invalid JSON"] == 1
    log = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(log) == len(bad) + 2 and all(x["key"].startswith("docs-") and x["input"] for x in log)
    docs = [d for s in manifest["shards"] for d in read_shard(str(out / s["name"]))]
    assert [len(d.images) for d in docs] == [2, 1, 0, 1]
    assert manifest["totals"]["image_tokens"] > 4 * 256 and manifest["totals"]["text_tokens"] > 10
    assert "wrote 4 samples" in capsys.readouterr().out


def test_prepare_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    assert main(["data", "prepare", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "holds files megatron_moca did not write ('x')" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep"
    assert (tmp_path / "out" / "x").read_text() == "keep"


def test_prepare_reads_parquet_with_binary_images(tmp_path, real_images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [open(p, "rb").read() for p in sorted(real_images, key=os.path.getsize)[:3]]
    moca = pa.table({"text": [f"a {PLACEHOLDER} b", "text only", f"{PLACEHOLDER}{PLACEHOLDER}"],
                     "images": [[data[0]], [], [data[1]]]})  # the last row lacks an image
    obelics = pa.table({"texts": [["intro", None, "outro"]], "images": [[None, data[2], None]]})
    (tmp_path / "in").mkdir()
    pq.write_table(moca, tmp_path / "in" / "moca.parquet")
    pq.write_table(obelics, tmp_path / "in" / "obelics.parquet")
    out = tmp_path / "out"
    assert main(["data", "prepare", "--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 3 and manifest["skipped"] == {"more image placeholders than images": 1}
    docs = [d for s in manifest["shards"] for d in read_shard(str(out / s["name"]))]
    from megatron_moca.data.prepare import key_prefix

    assert [d.key for d in docs] == [f"{key_prefix('moca.parquet')}-000000000", f"{key_prefix('moca.parquet')}-000000001",
                                     f"{key_prefix('obelics.parquet')}-000000000"]
    assert docs[0].images == [data[0]] and docs[2].images == [data[2]] and docs[2].segments == ["intro", 0, "outro"]
