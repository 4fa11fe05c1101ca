"""Hand-made bad stage-1 shards. One bad sample is skipped and counted under its reason (exact counts)
and never kills the loader; a data path with nothing usable, a shard over its bad-sample budget, and
a manifest naming missing or outside shards stop with one line naming the shard, before any step."""

import functools
import io
import json
import os
import struct
import tarfile

import pytest

from helpers import REPO, run_moca, write_stage1_shards
from megatron_moca.data.image_processing import ImageProcessingConfig
from megatron_moca.data.loader import DataError, LoaderConfig, Stage1Loader, stage1_builder
from megatron_moca.data.samples import Stage1SampleConfig
from megatron_moca.errors import UserError

SAMPLE = Stage1SampleConfig(max_length=200, image_pipeline="cpu",
                            image=ImageProcessingConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16))
FACTORY = functools.partial(stage1_builder, None, SAMPLE)
GOOD = 12


def good_json(i):
    return json.dumps({"segments": [{"text": f"a good document number {i} " * 4}], "source": "t", "meta": {}}).encode()


def png(size=64):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_raw_source(folder, samples, manifest_extra=()):
    """samples: list of (key, {suffix: bytes}) written as one shard (+ .idx + manifest) in order."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "shard-000000.tar")
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            offsets.append(tar.offset)
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(path + ".idx", "wb") as f:
        f.write(struct.pack(f"<{len(offsets)}q", *offsets))
    shards = [{"name": "shard-000000.tar", "samples": len(samples), "bytes": os.path.getsize(path)},
              *manifest_extra]
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"shards": shards}, f)
    return str(folder)


def source_with(folder, bad_members):
    """GOOD good text documents and one bad sample (key 'bad') in the middle."""
    samples = [(f"good{i:02d}", {"json": good_json(i)}) for i in range(GOOD)]
    samples.insert(GOOD // 2, ("bad", bad_members))
    return write_raw_source(folder, samples)


def make_loader(paths, factory=FACTORY, **cfg):
    config = LoaderConfig(paths=list(paths), seed=3, pack_length=256, **cfg)
    return Stage1Loader(config, factory, pad_id=151643, image_token_id=151655)


def read_all_once(loader_):
    """Rows until every sample of the (one-shard) source was consumed at least once; the loader's state
    after, with `bad_reads`: how often the sample 'bad' (position GOOD // 2) was consumed by then."""
    rows = iter(loader_)
    while loader_.state_dict()["counts"][0] < GOOD + 1:
        next(rows)
    state = loader_.state_dict()
    source = loader_.sources[0]
    state["bad_reads"] = sum(source.locate(j)[1] == GOOD // 2 for j in range(state["counts"][0]))
    return state


BAD_SAMPLES = {
    "malformed_json": ({"json": b"{not json"}, "bad_json"),
    "not_utf8": ({"json": b"\xff\xfe{}"}, "bad_json"),
    "segments_not_a_list": ({"json": b'{"segments": "text"}'}, "bad_json"),
    "json_is_a_list": ({"json": b"[1, 2]"}, "bad_json"),
    "text_is_a_number": ({"json": b'{"segments": [{"text": 5}]}'}, "bad_json"),
    "image_index_is_a_string": ({"json": b'{"segments": [{"image": "0"}]}', "img0.png": png()}, "bad_json"),
    "no_json_member": ({"img0.png": png()}, "bad_json"),
    "absurd_member_index": ({"json": b'{"segments": [{"image": 0}]}', "img99999999999.png": png()}, "image_index"),
    "absurd_segment_index": ({"json": b'{"segments": [{"image": 1000000000000}]}'}, "image_index"),
    "gap_in_image_members": ({"json": b'{"segments": [{"image": 0}]}', "img0.png": png(), "img2.png": png()},
                             "image_index"),
    "truncated_image": ({"json": b'{"segments": [{"text": "x"}, {"image": 0}]}', "img0.png": png(256)[:300]},
                        "bad_image"),
    "oversized_member": ({"json": b'{"segments": [{"text": "x"}]}', "img0.png": b"\0" * 5000}, "oversized_member"),
    "vision_tokens_in_text": ({"json": json.dumps({"segments": [{"text": "hi <|image_pad|> there"}]}).encode()},
                              "bad_text"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_one_bad_sample_is_skipped_and_counted_by_reason(case, tmp_path):
    members, kind = BAD_SAMPLES[case]
    folder = source_with(tmp_path / "src", members)
    state = read_all_once(make_loader([folder], max_bad_sample_fraction=1.0, max_member_bytes=4096))
    assert state["bad_reads"] >= 1 and state["skipped"] == {kind: state["bad_reads"]}


def test_an_unexpected_error_in_one_sample_is_counted_not_raised(tmp_path):
    class Fragile:
        def __init__(self):
            self.inner = stage1_builder(None, SAMPLE)

        def build(self, doc, rng):
            if doc.key == "bad":
                raise RuntimeError("a bug that only this document hits")
            return self.inner.build(doc, rng)

    samples = [(f"good{i:02d}", {"json": good_json(i)}) for i in range(GOOD + 1)]
    samples[GOOD // 2] = ("bad", {"json": good_json(99)})  # a fine document that the builder fails on
    folder = write_raw_source(tmp_path / "src", samples)
    state = read_all_once(make_loader([folder], max_bad_sample_fraction=1.0, factory=Fragile))
    assert state["skipped"] == {"unexpected_error": state["bad_reads"]}


def test_the_default_budget_stops_at_a_shard_over_it(tmp_path):
    folder = source_with(tmp_path / "src", {"json": b"{oops"})
    with pytest.raises(DataError) as err:
        read_all_once(make_loader([folder]))  # 1 of 13 samples > 1%
    assert str(err.value).startswith(f"{folder}/shard-000000.tar: 1 unusable samples of its 13 ")
    assert "data.max_bad_sample_fraction=0.01" in str(err.value)
    # a budget that admits it: 1 of 13 < 10%
    state = read_all_once(make_loader([folder], max_bad_sample_fraction=0.1))
    assert state["skipped"] == {"bad_json": state["bad_reads"]}


def test_a_source_with_no_usable_sample_stops_after_one_pass(tmp_path):
    folder = write_raw_source(tmp_path / "src", [(f"k{i}", {"json": b"[]"}) for i in range(20)])
    rows = iter(make_loader([folder], max_bad_sample_fraction=1.0))
    with pytest.raises(DataError, match=f"data path {folder}: no usable sample in a whole pass over its 20 samples"):
        next(rows)


@pytest.mark.parametrize("extra, message", [
    ({"name": "shard-000001.tar", "samples": 3}, "names shard-000001.tar, which is missing from"),
    ({"name": "../elsewhere.tar", "samples": 3}, "names '../elsewhere.tar', which is not a file inside"),
    ({"name": "/etc/passwd", "samples": 3}, "names '/etc/passwd', which is not a file inside"),
    ({"name": "shard-000000.tar", "samples": "many"}, "is not a shard manifest (ValueError"),
])
def test_a_bad_manifest_is_refused_up_front(extra, message, tmp_path):
    folder = write_raw_source(tmp_path / "src", [("k0", {"json": good_json(0)})], manifest_extra=[extra])
    with pytest.raises(UserError, match=None) as err:
        make_loader([folder])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


RECIPE = os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml")
STAGE1 = ["sample.max_length=100", "data.pack_length=128", "logging.log_interval=1"]


def test_pretrain_refuses_bad_data_in_one_line_and_logs_skips(tmp_path):
    """Through `moca pretrain`: a missing shard and an all-bad source stop in one line; a path with a
    few bad samples trains, and metrics.jsonl and the log line carry the skip counts by reason."""
    missing = write_raw_source(tmp_path / "missing", [("k0", {"json": good_json(0)})],
                               manifest_extra=[{"name": "shard-000001.tar", "samples": 1}])
    proc = run_moca("pretrain", "--config", RECIPE, f"data.paths={missing}", f"checkpoint.save={tmp_path / 'r1'}",
                    *STAGE1, "train.train_iters=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"moca: error: data.paths: {missing}/manifest.json names "
                                                    f"shard-000001.tar, which is missing from {missing}")
    assert not os.path.exists(tmp_path / "r1")  # refused before anything was written
    all_bad = write_raw_source(tmp_path / "allbad", [(f"k{i}", {"json": b"{"}) for i in range(30)])
    proc = run_moca("pretrain", "--config", RECIPE, f"data.paths={all_bad}", f"checkpoint.save={tmp_path / 'r2'}",
                    *STAGE1, "train.train_iters=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"moca: error: {all_bad}/shard-000000.tar: 1 unusable")
    assert not os.path.exists(tmp_path / "r2" / "metrics.jsonl")  # no step ran

    mixed = write_stage1_shards(tmp_path / "mixed", documents=24)
    bad = write_raw_source(tmp_path / "bad", [("b0", {"json": b"[]"}), ("b1", {"json": b"{"}),
                                              ("b2", {"json": b'{"segments": [{"image": 7}]}'})] +
                           [(f"g{i}", {"json": good_json(i)}) for i in range(5)])
    save = tmp_path / "r3"
    proc = run_moca("pretrain", "--config", RECIPE, f"data.paths={mixed},{bad}", f"checkpoint.save={save}", *STAGE1,
                    "train.train_iters=4", "data.max_bad_sample_fraction=1.0", "data.weights=1,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(save / "metrics.jsonl")]
    # the plan is a pure function of the seed: the same samples are drawn, and skipped, every run
    assert [r["skipped_samples"] for r in records] == [{}, {"bad_json": 1, "image_index": 1},
                                                       {"bad_json": 1, "image_index": 1},
                                                       {"bad_json": 2, "image_index": 2}]
    assert "skipped bad_json" in proc.stderr


def test_data_verify_names_a_corrupted_shard(tmp_path):
    shards = write_stage1_shards(tmp_path / "shards", documents=20)
    ok = run_moca("data", "verify", shards)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("every shard matches its manifest"), ok.stderr
    victim = os.path.join(shards, "shard-000001.tar")
    with tarfile.open(victim) as tar:
        start = next(m for m in tar.getmembers() if m.name.endswith(".json")).offset_data
    data = bytearray(open(victim, "rb").read())
    data[start:start + 4] = b"\xff" * 4  # the first .json member's opening bytes: same size, not UTF-8
    open(victim, "wb").write(bytes(data))
    proc = run_moca("data", "verify", shards)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"{victim}: sha256 differs from the manifest; unusable samples: 1 bad_json"]
    assert "1 shard(s) with problems" in proc.stdout
