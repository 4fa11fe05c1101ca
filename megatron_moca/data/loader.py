"""Stage-1 loader: weighted blending of shard sources, data-parallel sharding, worker processes,
exact save/restore, all deterministic given a seed.

The plan is a pure function of the seed: global step t picks a source with a weighted draw from
rng(seed, t); that source's local index j maps to (epoch, shard, offset) through a per-epoch shard
permutation and the shards' sample counts; the sample's masking RNG is rng(seed, source, j). Data-
parallel rank r takes the global steps t = r, r + dp, r + 2dp, ...: ranks are disjoint and together
cover every step. Workers (a spawn-context process pool fed step numbers) only read and build
samples; the main process packs them in order. State = the first step not yet packed plus the
sources' counters at that step: restoring it reproduces every following row exactly, with any
number of workers. Bad samples are skipped with a counted reason (key + shard), never raised.
Design after megatron-energon's savable loaders and torchtitan's stateful dataloader.
"""

from __future__ import annotations

import bisect
import collections
import functools
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from megatron_moca.data.shards import ReadError, index_shard, manifest_path, read_sample
from megatron_moca.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    """Where stage-1 samples come from and how they are blended, sharded and packed."""

    paths: List[str] = field(default_factory=list)
    """Shard folders (each with manifest.json)."""
    weights: Optional[List[float]] = None
    """Blend weight per folder (default: proportional to sample counts)."""
    seed: int = 1234
    """Seed of the plan (source draws, shard order) and of masking."""
    pack_length: int = 4096
    """Tokens per packed row."""
    pad_to_multiple: int = 1
    """Round rows up to this multiple (16 for FP8)."""
    num_workers: int = 0
    """Reader/builder processes (0 = in the main process)."""
    prefetch: int = 4
    """Samples in flight per worker."""


class Source:
    """One shard folder: sample counts per shard, and (epoch, local index) -> (shard path, offset)."""

    def __init__(self, folder: str, source_id: int, seed: int):
        manifest = manifest_path(folder, "data path")
        with open(manifest) as f:
            shards = json.load(f)["shards"]
        self.folder, self.source_id, self.seed = folder, source_id, seed
        self.names = [s["name"] for s in shards]
        self.counts = [int(s["samples"]) for s in shards]
        self.total = sum(self.counts)
        if not self.total:
            raise UserError(f"data path {folder}: the manifest lists no samples")
        self._offsets: Dict[str, List[int]] = {}
        self._epoch_cache: Tuple[int, List[int], List[int]] = (-1, [], [])

    def _epoch_layout(self, epoch: int):
        if self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, self.source_id, epoch, 7]).permutation(len(self.names)).tolist()
            starts = np.cumsum([0] + [self.counts[i] for i in order]).tolist()
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def locate(self, local_index: int) -> Tuple[str, int]:
        """(shard path, sample position in that shard) of the source's local_index-th sample."""
        epoch, pos = divmod(local_index, self.total)
        order, starts = self._epoch_layout(epoch)
        k = bisect.bisect_right(starts, pos) - 1
        return os.path.join(self.folder, self.names[order[k]]), pos - starts[k]

    def read(self, local_index: int):
        path, position = self.locate(local_index)
        if path not in self._offsets:
            self._offsets[path] = index_shard(path) if os.path.isfile(path) else []
        offsets = self._offsets[path]
        if position >= len(offsets):
            return ReadError("", os.path.basename(path), "sample missing from shard (truncated or unreadable)")
        return read_sample(path, offsets[position])


class Plan:
    """The deterministic global sequence of (source, local index); O(1) per step, resumable."""

    def __init__(self, weights: List[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise UserError(f"data weights {weights}: must be non-negative with a positive sum")
        self.cdf = np.cumsum(w / w.sum())
        self.seed = seed

    def source_of(self, step: int) -> int:
        u = np.random.default_rng([self.seed, step, 3]).random()
        return min(int(np.searchsorted(self.cdf, u, side="right")), len(self.cdf) - 1)


@dataclass
class LoaderState:
    step: int = 0  # next global step to consider
    counts: List[int] = field(default_factory=list)  # per source: local indices used before `step`
    skipped: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"step": self.step, "counts": list(self.counts), "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(int(d["step"]), [int(c) for c in d["counts"]], dict(d.get("skipped", {})))


class _SampleBuilderDataset:
    """(step, source, local index) -> (..., Stage1Sample | ReadError); built lazily in each worker."""

    def __init__(self, cfg: LoaderConfig, builder_factory):
        self.cfg, self.builder_factory = cfg, builder_factory
        self._sources = None
        self._builder = None

    def __call__(self, item):
        from megatron_moca.data.documents import DocumentError

        step, source_id, local_index = item
        if self._sources is None:
            self._sources = [Source(p, i, self.cfg.seed) for i, p in enumerate(self.cfg.paths)]
            self._builder = self.builder_factory()
        doc = self._sources[source_id].read(local_index)
        if isinstance(doc, ReadError):
            return step, source_id, local_index, doc
        try:
            rng = np.random.default_rng([self.cfg.seed, source_id, local_index, 11])
            return step, source_id, local_index, self._builder.build(doc, rng)
        except DocumentError as e:
            return step, source_id, local_index, ReadError(doc.key, self._sources[source_id].locate(local_index)[0],
                                                           str(e))


_WORKER_DATASET = None


def _init_worker(cfg: LoaderConfig, builder_factory) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = _SampleBuilderDataset(cfg, builder_factory)


def _work(item):
    return _WORKER_DATASET(item)


def stage1_builder(tokenizer_dir: Optional[str] = None, sample_cfg=None):
    """Default builder factory (picklable via functools.partial): the Qwen tokenizer + Stage1SampleBuilder."""
    from megatron_moca.data.samples import Stage1SampleBuilder, Stage1SampleConfig
    from megatron_moca.data.tokenizer import QwenTokenizer

    return Stage1SampleBuilder(QwenTokenizer(tokenizer_dir), sample_cfg or Stage1SampleConfig())


def stage1_builder_factory(tokenizer_dir: Optional[str] = None, sample_cfg=None) -> functools.partial:
    """`stage1_builder` bound to its arguments, with `image_pipeline` resolved HERE: in the trainer's
    process, which knows its device, so that loader workers get a concrete pipeline and never probe CUDA
    or DALI themselves (each spawned worker would otherwise initialise the CUDA driver to decide)."""
    from megatron_moca.data.samples import Stage1SampleConfig, resolve_image_pipeline

    cfg = sample_cfg or Stage1SampleConfig()
    cfg = replace(cfg, image_pipeline=resolve_image_pipeline(cfg.image_pipeline))
    return functools.partial(stage1_builder, tokenizer_dir, cfg)


class Stage1Loader:
    """Iterates packed rows (PackedBatch) for one data-parallel rank."""

    def __init__(self, cfg: LoaderConfig, builder_factory, pad_id: int, image_token_id: int, dp_rank: int = 0,
                 dp_size: int = 1, state: Optional[dict] = None):
        if not cfg.paths:
            raise UserError("data.paths is empty: name at least one shard folder")
        self.cfg, self.builder_factory = cfg, builder_factory
        self.sources = [Source(p, i, cfg.seed) for i, p in enumerate(cfg.paths)]
        weights = cfg.weights or [s.total for s in self.sources]
        if len(weights) != len(self.sources):
            raise UserError(f"data.weights has {len(weights)} entries for {len(self.sources)} paths")
        self.plan = Plan(weights, cfg.seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pad_id, self.image_token_id = pad_id, image_token_id
        self.state = LoaderState.from_dict(state) if state else LoaderState(0, [0] * len(self.sources))
        self._emitted = LoaderState(self.state.step, list(self.state.counts), dict(self.state.skipped))

    # -- planning (main process, cheap) ---------------------------------------------------------
    def _plan(self, state: LoaderState) -> Iterator[Tuple[int, int, int, List[int]]]:
        """(step, source, local index, counts before this step) of this rank's steps, from `state`."""
        step, counts = state.step, list(state.counts)
        while True:
            source = self.plan.source_of(step)
            before = list(counts)
            counts[source] += 1
            if step % self.dp_size == self.dp_rank:
                yield step, source, counts[source] - 1, before
            step += 1

    def state_dict(self) -> dict:
        """Position after the last row handed out: restoring it reproduces every following row."""
        return self._emitted.to_dict()

    def samples(self) -> Iterator[tuple]:
        """(source counts before the step, (step, source, local index, Stage1Sample or ReadError)) in plan
        order for this rank, before packing."""
        dataset = _SampleBuilderDataset(self.cfg, self.builder_factory)
        plan = self._plan(self.state)
        if self.cfg.num_workers <= 0:
            for step, source, local, before in plan:
                yield before, dataset((step, source, local))
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        window = self.cfg.num_workers * self.cfg.prefetch
        with ctx.Pool(self.cfg.num_workers, _init_worker, (self.cfg, self.builder_factory)) as pool:
            pending = collections.deque()
            for item in plan:
                pending.append((item[3], pool.apply_async(_work, (item[:3],))))
                if len(pending) >= window:
                    before, result = pending.popleft()
                    yield before, result.get()
            # the plan is infinite: the loop above never falls through

    def __iter__(self):
        from megatron_moca.data.samples import GreedyPacker

        packer = GreedyPacker(self.cfg.pack_length, self.pad_id, self.cfg.pad_to_multiple, self.image_token_id)
        skipped = dict(self.state.skipped)
        for before, (step, source, local, sample) in self.samples():
            if not isinstance(sample, ReadError) and len(sample) > self.cfg.pack_length:
                sample = ReadError(sample.key, self.cfg.paths[source], f"longer than a packed row "
                                   f"(pack_length {self.cfg.pack_length}); raise it or lower max_length")
            if isinstance(sample, ReadError):
                reason = sample.reason
                skipped[reason] = skipped.get(reason, 0) + 1
                log.warning("skipped sample %s in %s: %s", sample.key, sample.shard, reason)
                continue
            row = packer.add(sample)
            if row is not None:
                # this sample opened the next row: resuming from it reproduces every later row
                self._emitted = LoaderState(step, before, dict(skipped))
                yield row
