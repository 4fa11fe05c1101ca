"""The demo corpus from pinned Debian packages (fetched with apt-get in CI, ~110 MB), and stage-1 samples and
loader rows built from it: real interleaved documents end to end."""

import itertools
import os
import shutil

import numpy as np
import pytest

from megatron_moca.data import demo_corpus
from megatron_moca.data.loader import LoaderConfig, Stage1Loader, stage1_builder_factory
from megatron_moca.data.samples import Stage1SampleBuilder, Stage1SampleConfig
from megatron_moca.data.shards import read_shard
from megatron_moca.errors import UserError
from megatron_moca.objectives.masking import IGNORE_INDEX

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not on this machine")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = os.environ.get("MOCA_DEMO_CACHE") or str(tmp_path_factory.mktemp("debian"))
    out = str(tmp_path_factory.mktemp("demo") / "shards")
    manifest = demo_corpus.build_demo(out, cache=cache, max_per_source=12, workers=2, log=lambda *a: None)
    return out, manifest


@needs_apt
def test_demo_corpus_has_all_three_sources(demo):
    out, manifest = demo
    assert manifest["inputs"][0].startswith("gimp-help-en=") and len(manifest["inputs"]) == 4
    docs = [d for s in manifest["shards"] for d in read_shard(os.path.join(out, s["name"]))]
    sources = {d.source for d in docs}
    assert sources == {"gimp-help-en", "python-skimage-doc", "wordnet-base", "r-doc-pdf"}
    pages = [d for d in docs if d.source == "r-doc-pdf"]
    assert pages and all(d.segments[0] == 0 and len(d.images) == 1 for d in pages)
    assert not any(d.meta.get("pdf") in ("R-intro.pdf", "R-data.pdf", "R-lang.pdf") for d in pages)
    assert sum(len(d.images) for d in docs) >= 20  # real screenshots and figures, in place
    interleaved = [d for d in docs if d.images and isinstance(d.segments[0], str)]
    assert interleaved and all(isinstance(s, (str, int)) for d in interleaved for s in d.segments)
    assert not any("prev.png" in str(d.meta) for d in docs)
    assert manifest["totals"]["image_tokens"] > 0 and manifest["totals"]["text_tokens"] > 10000


@needs_apt
def test_masking_statistics_on_demo_documents(demo, tokenizer):
    out, manifest = demo
    builder = Stage1SampleBuilder(tokenizer, Stage1SampleConfig(image_pipeline="cpu"))
    docs = [d for s in manifest["shards"] for d in read_shard(os.path.join(out, s["name"]))][:20]
    masked = maskable = groups = noised = 0
    for i, d in enumerate(docs):
        s = builder.build(d, np.random.default_rng(i))
        original = np.where(s.labels != IGNORE_INDEX, s.labels, s.input_ids)
        special = np.isin(original, list(tokenizer.special_ids))
        assert not (s.labels[special] != IGNORE_INDEX).any()
        maskable += int((~special).sum())
        masked += int((s.labels != IGNORE_INDEX).sum())
        image = s.input_ids == tokenizer.image_pad_id
        groups += int(image.sum())
        noised += int(s.mae_token_mask[image].sum())
    assert abs(masked / maskable - 0.4) < 5 * (0.24 / maskable) ** 0.5
    assert groups > 100 and abs(noised / groups - 0.5) < 5 * (0.25 / groups) ** 0.5


@needs_apt
def test_loader_rows_from_demo_shards(demo):
    out, _ = demo
    cfg = LoaderConfig(paths=[out], seed=3, pack_length=2048, pad_to_multiple=16)
    rows = list(itertools.islice(iter(Stage1Loader(cfg, stage1_builder_factory(), 151643, 151655)), 3))
    for row in rows:
        assert row.input_ids.shape[1] == 2048
        docs = row.document_ids[0]
        n = int((docs >= 0).sum())
        assert (docs[:n] >= 0).all() and (docs[n:] == -1).all()  # documents first, padding last
        steps = docs[1:n] - docs[:n - 1]
        assert ((steps == 0) | (steps == 1)).all() and int(docs[n - 1]) + 1 == len(row.keys)


def test_clear_error_without_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(demo_corpus.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="moca data prepare"):
        demo_corpus.fetch_packages(str(tmp_path))
