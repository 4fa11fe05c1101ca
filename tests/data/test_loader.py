"""The stage-1 loader on real documents: exact resume, worker-count independence, data-parallel
disjointness and coverage, blending weights, bad shards skipped with reasons."""

import dataclasses
import functools
import itertools
import json
import os

import numpy as np
import pytest
import torch

from megatron_moca.data.documents import Document
from megatron_moca.data.image_processing import ImageProcessingConfig
from megatron_moca.data.loader import (DataError, LoaderConfig, Plan, Stage1Loader, stage1_builder,
                                       stage1_builder_factory)
from megatron_moca.data.samples import Stage1SampleConfig
from megatron_moca.data.shards import MANIFEST, ShardWriter
from megatron_moca.errors import UserError

SMALL = Stage1SampleConfig(max_length=400, image_pipeline="cpu", image=ImageProcessingConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16))
FACTORY = functools.partial(stage1_builder, None, SMALL)


def write_source(folder, docs, per_shard):
    import json

    writer = ShardWriter(str(folder), max_shard_bytes=1 << 40, max_shard_samples=per_shard)
    for d in docs:
        writer.write(d)
    shards = writer.close()
    (folder / MANIFEST).write_text(json.dumps({"shards": [vars(s) for s in shards]}))
    return str(folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, real_images):
    small = sorted(real_images, key=os.path.getsize)[:8]
    data = [open(p, "rb").read() for p in small]
    root = tmp_path_factory.mktemp("loader")

    def docs(prefix, n):
        return [Document(f"{prefix}-{i:03d}", [f"{prefix} document {i} " * (3 + i % 5), 0, "after " * (i % 7)],
                         [data[i % len(data)]]) if i % 3 else Document(f"{prefix}-{i:03d}", [f"text only {i} " * 9], [])
                for i in range(n)]

    a = write_source(root / "a", docs("a", 30), per_shard=8)
    b = write_source(root / "b", docs("b", 10), per_shard=10)
    return a, b


def loader(paths, **kw):
    cfg = LoaderConfig(paths=list(paths), seed=kw.pop("seed", 5), pack_length=kw.pop("pack_length", 600),
                       pad_to_multiple=16, num_workers=kw.pop("num_workers", 0), weights=kw.pop("weights", None),
                       max_bad_sample_fraction=kw.pop("max_bad_sample_fraction", 0.01),
                       max_samples_per_source=kw.pop("max_samples_per_source", 0))
    return Stage1Loader(cfg, FACTORY, pad_id=151643, image_token_id=151655, **kw)


def rows_equal(a, b):
    return a.keys == b.keys and all(torch.equal(getattr(a, f), getattr(b, f)) for f in
                                    ("input_ids", "labels", "document_ids", "position_ids", "mae_token_mask")) and \
        ((a.pixel_frames is None and b.pixel_frames is None) or torch.equal(a.pixel_frames, b.pixel_frames)) and \
        len(a.device_images) == len(b.device_images) and all(map(torch.equal, a.device_images, b.device_images))


def take_samples(it, n):
    """Rows until at least n samples were handed out."""
    rows, count = [], 0
    while count < n:
        rows.append(next(it))
        count += len(rows[-1].keys)
    return rows


def test_save_restore_next_100_samples_identical(sources):
    first = loader(sources)
    it = iter(first)
    take_samples(it, 25)  # past an epoch boundary of source b, into the middle of the stream
    state = first.state_dict()
    expected = take_samples(it, 100)
    resumed = loader(sources, state=state)
    got = take_samples(iter(resumed), 100)
    assert len(got) >= len(expected) and all(rows_equal(a, b) for a, b in zip(expected, got))


def test_workers_do_not_change_the_stream(sources):
    base = list(itertools.islice(iter(loader(sources)), 6))
    with_workers = list(itertools.islice(iter(loader(sources, num_workers=2)), 6))
    assert all(rows_equal(a, b) for a, b in zip(base, with_workers))


def test_device_resize_through_worker_processes_gives_the_same_model_inputs(sources):
    device_factory = functools.partial(stage1_builder, None, dataclasses.replace(SMALL, image_pipeline="device_resize"))
    cfg = LoaderConfig(paths=list(sources), seed=5, pack_length=600, pad_to_multiple=16, num_workers=2)
    on_device = list(itertools.islice(iter(Stage1Loader(cfg, device_factory, pad_id=151643, image_token_id=151655)), 5))
    base = list(itertools.islice(iter(loader(sources)), 5))
    assert sum(len(row.device_images) for row in on_device) > 0
    for a, b in zip(base, on_device):
        ref, got = a.model_inputs(), b.model_inputs()
        for key, value in ref.items():
            assert (value is None and got[key] is None) or torch.equal(value, got[key]), key


def test_data_parallel_ranks_are_disjoint_and_cover_an_epoch(sources):
    single = sources[:1]  # 30 documents: the first 30 global steps are exactly one epoch
    seen = []
    for rank in range(2):
        keys = []
        for _, (step, _, _, sample) in loader(single, dp_rank=rank, dp_size=2).samples():
            if step >= 30:
                break
            assert step % 2 == rank
            keys.append(sample.key)
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"a-{i:03d}" for i in range(30)]


def test_blend_weights_are_respected():
    plan = Plan([3.0, 1.0], seed=1)
    picks = np.array([plan.source_of(t) for t in range(4000)])
    share = (picks == 0).mean()
    assert abs(share - 0.75) < 5 * (0.75 * 0.25 / 4000) ** 0.5


def test_default_weights_follow_sample_counts(sources):
    ld = loader(sources)
    picks = [ld.plan.source_of(t) for t in range(4000)]
    assert abs(np.mean(np.array(picks) == 0) - 30 / 40) < 0.04


def test_truncated_shard_is_skipped_with_reasons(sources, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sources[0], broken)
    shard = sorted(p for p in os.listdir(broken) if p.endswith(".tar"))[0]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[:len(data) // 3])
    os.remove(broken / (shard + ".idx"))  # an index would still point past the cut; scan instead
    with pytest.raises(UserError, match=f"{shard} holds {len(data) // 3} bytes, the manifest says {len(data)}"):
        loader([str(broken)])  # refused up front: the manifest's byte count no longer matches
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["shards"][0]["bytes"] = len(data) // 3  # a manifest that agrees with the cut shard
    (broken / MANIFEST).write_text(json.dumps(manifest))
    ld = loader([str(broken)], max_bad_sample_fraction=1.0)  # no budget: skip and count
    it = iter(ld)
    rows = take_samples(it, 40)
    state = ld.state_dict()
    assert set(state["skipped"]) == {"unreadable_sample"} and state["skipped"]["unreadable_sample"] >= 1
    assert sum(len(r.keys) for r in rows) >= 40
    with pytest.raises(DataError, match=f"broken/{shard}: 1 unusable samples of its 8 "):
        take_samples(iter(loader([str(broken)])), 40)  # the default 1% budget stops at the first bad sample


def test_builder_factory_resolves_the_image_pipeline_in_the_calling_process(monkeypatch):
    from megatron_moca.data import samples
    from megatron_moca.data.dali import dali_available

    auto = dataclasses.replace(SMALL, image_pipeline="auto")
    assert stage1_builder_factory(None, auto).args[1].image_pipeline == "cpu"  # no CUDA here
    monkeypatch.setattr(samples.torch.cuda, "is_available", lambda: True)
    factory = stage1_builder_factory(None, auto)
    assert factory.args[1].image_pipeline == ("dali" if dali_available() else "device_resize")

    def probe():
        raise AssertionError("a worker probed CUDA")

    monkeypatch.setattr(samples.torch.cuda, "is_available", probe)
    assert factory().pipeline == factory.args[1].image_pipeline  # what a worker builds: no probing
    with pytest.raises(AssertionError, match="probed CUDA"):
        stage1_builder(None, auto)  # unresolved, the builder itself would probe


def test_max_samples_per_source_uses_the_first_samples_and_sets_the_blend(sources):
    """Source a holds 30 documents in shards of 8: a cap of 12 keeps shard 0 and 4 of shard 1, every epoch;
    the default blend weights follow the capped sizes (12 : 10)."""
    import collections

    ld = loader(sources, max_samples_per_source=12)
    a, b = ld.sources
    assert (a.total, b.total) == (12, 10) and a.counts == [8, 4]
    seen = collections.Counter(a.locate(j) for j in range(36))  # three epochs
    assert set(seen) == {(os.path.join(sources[0], a.names[0]), k) for k in range(8)} | \
        {(os.path.join(sources[0], a.names[1]), k) for k in range(4)} and set(seen.values()) == {3}
    assert np.allclose(np.diff(ld.plan.cdf, prepend=0), [12 / 22, 10 / 22])


def text_source(folder, n, bad=()):
    """A one-shard source of n short text documents; those in `bad` hold a stray <|image_pad|> (the sample
    builder refuses them: skipped as bad_text)."""
    docs = [Document(f"t-{i:03d}", [f"document {i} " * 4 + (" <|image_pad|>" if i in bad else "")], [])
            for i in range(n)]
    return write_source(folder, docs, per_shard=n)


def keys_by_epoch(ld, n, epochs):
    """{epoch: [keys in the order this rank read them]} (bad samples included) over `epochs` passes."""
    out = {}
    for _, (step, _, local, sample) in ld.samples():
        if local >= n * epochs:
            return out
        out.setdefault(local // n, []).append(sample.key)


def test_permuted_order_changes_every_epoch_and_is_fixed_by_the_seed(tmp_path):
    src = text_source(tmp_path / "s", 40)
    epochs = keys_by_epoch(loader([src]), 40, 3)
    assert all(sorted(keys) == [f"t-{i:03d}" for i in range(40)] for keys in epochs.values())  # each a whole pass
    assert len({tuple(keys) for keys in epochs.values()}) == 3  # three different orders
    assert epochs[0] != sorted(epochs[0])  # not the manifest order
    assert keys_by_epoch(loader([src]), 40, 3) == epochs  # the same seed, the same orders
    assert keys_by_epoch(loader([src], seed=6), 40, 1)[0] != epochs[0]


@pytest.mark.parametrize("margin, raises", [(0.0, False), (-0.5, True)])
def test_bad_sample_budget_is_per_rank_and_per_epoch_at_its_boundary(tmp_path, margin, raises):
    """40 samples, 6 of them bad, 2 data-parallel ranks, 3 epochs. Each (rank, epoch) is charged the bad samples
    it read (seen from the stream, not from the loader's counters); the budget fraction x 40 / 2 allows exactly
    the largest of those counts, and half a sample less stops the run at that count."""
    bad = {1, 7, 8, 20, 33, 39}
    src = text_source(tmp_path / "s", 40, bad)
    charged = {}
    for rank in range(2):
        for epoch, keys in keys_by_epoch(loader([src], dp_rank=rank, dp_size=2), 40, 3).items():
            charged[rank, epoch] = sum(int(k[2:]) in bad for k in keys)
    assert sum(charged[r, 0] for r in range(2)) == 6 and len(set(charged.values())) > 1
    worst = max(charged.values())
    fraction = (worst + margin) * 2 / 40
    for rank in range(2):
        ld = loader([src], dp_rank=rank, dp_size=2, max_bad_sample_fraction=fraction)
        it = iter(ld)
        will_raise = raises and worst in [charged[rank, e] for e in range(3)]
        if will_raise:
            with pytest.raises(DataError, match=f"shard-000000.tar: {worst} unusable samples of its 40 "):
                take_samples(it, 60)
        else:
            take_samples(it, 55)  # three epochs of this rank's 20 samples, less its bad ones
            assert ld.state_dict()["skipped"]["bad_text"] >= sum(charged[rank, e] for e in range(2))


def test_a_pass_without_any_usable_sample_stops_after_this_ranks_share(tmp_path, caplog):
    import logging

    src = text_source(tmp_path / "all_bad", 40, bad=set(range(40)))
    for rank in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron_moca.data.loader"):
            with pytest.raises(DataError, match="no usable sample in a whole pass over its 40 samples"):
                next(iter(loader([src], dp_rank=rank, dp_size=2, max_bad_sample_fraction=1.0)))
        # this rank's share of a pass is 20 reads, but never fewer than 32 (or the whole source)
        assert sum("skipped sample" in r.getMessage() for r in caplog.records) == 32
    # good and bad interleaved (every odd document bad): over 7 passes this rank skips about 70 samples, far more
    # than 32, but never 32 in a row - the count restarts at each good one, so the run goes on
    half = text_source(tmp_path / "half", 40, bad=set(range(1, 40, 2)))
    ld = loader([half], dp_rank=1, dp_size=2, max_bad_sample_fraction=1.0)
    take_samples(iter(ld), 70)
    assert ld.state_dict()["skipped"]["bad_text"] >= 60
