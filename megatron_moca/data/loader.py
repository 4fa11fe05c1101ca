"""Stage-1 loader: weighted blending of shard sources, data-parallel sharding, worker processes,
exact save/restore, all deterministic given a seed.

The plan is a pure function of the seed: global step t picks a source with a weighted draw from
rng(seed, t); that source's local index j maps to (epoch, shard, offset) through a per-epoch
pseudo-random permutation of all the source's samples (data/permutation.py; or, with
data.sample_order=sequential, a per-epoch shard order read front to back) and the shards' sample
counts; the sample's masking RNG is rng(seed, source, j). Data-
parallel rank r takes the global steps t = r, r + dp, r + 2dp, ...: ranks are disjoint and together
cover every step. Workers (a spawn-context process pool fed step numbers) only read and build
samples; the main process packs them in order. State = the first step not yet packed plus the
sources' counters at that step: restoring it reproduces every following row exactly, with any
number of workers. Bad samples are skipped and counted by reason (shards.SKIP_REASONS; logged with key
and shard), never raised; a shard whose share of bad samples passes data.max_bad_sample_fraction, or a
source with no usable sample in a whole pass, stops the run with DataError naming it.
Design after megatron-energon's savable loaders and torchtitan's stateful dataloader.
"""

from __future__ import annotations

import bisect
import collections
import functools
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from megatron_moca.data.permutation import IndexPermutation
from megatron_moca.data.shards import MAX_MEMBER_BYTES, ReadError, index_shard, read_manifest, read_sample
from megatron_moca.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    """Where stage-1 samples come from and how they are blended, sharded and packed."""

    paths: List[str] = field(default_factory=list)
    """Shard folders (each with manifest.json)."""
    weights: Optional[List[float]] = None
    """Blend weight per folder (default: proportional to sample counts, after max_samples_per_source)."""
    max_samples_per_source: int = 0
    """Use at most this many samples of each data.paths entry: its first ones in manifest order (0: all;
    the MoCa reference caps each of its 10 sources at 500k)."""
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
    max_member_bytes: int = MAX_MEMBER_BYTES
    """Largest shard member (a document's .json or one encoded image) read; larger ones skip the sample."""
    sample_order: str = "permuted"
    """`permuted`: each epoch visits a source's samples in a pseudo-random order over all its shards
    (O(1) state, read through the shards' .idx); `sequential`: shards in a per-epoch random order, each
    read front to back (consecutive steps then read neighbouring documents of one input file)."""
    max_bad_sample_fraction: float = 0.01
    """Stop the run when more than this share of one shard's samples (per epoch, per data-parallel rank's
    share of the shard) cannot be used; 1.0 only stops on a source with no usable sample at all."""


SAMPLE_ORDERS = ("permuted", "sequential")


class DataError(UserError):
    """The data cannot feed the run (a shard over its bad-sample budget, a source with nothing usable)."""


class Source:
    """One shard folder: sample counts per shard, and (epoch, local index) -> (shard path, offset)."""

    def __init__(self, folder: str, source_id: int, seed: int, max_member_bytes: int = MAX_MEMBER_BYTES,
                 order: str = "permuted", max_samples: int = 0):
        """max_samples: use only the source's first samples in manifest order (0: all of them)."""
        shards = read_manifest(folder, "data path")
        self.folder, self.source_id, self.seed = folder, source_id, seed
        self.max_member_bytes, self.order = max_member_bytes, order
        self.names, self.counts = [], []
        for shard in shards:
            room = max_samples - sum(self.counts) if max_samples else shard["samples"]
            if room <= 0:
                break
            self.names.append(shard["name"])
            self.counts.append(min(int(shard["samples"]), room))
        self.total = sum(self.counts)
        if not self.total:
            raise UserError(f"data path {folder}: the manifest lists no samples")
        self._offsets: Dict[str, np.ndarray] = {}
        self._epoch_cache: tuple = (-1, [], [], None)

    def _epoch_layout(self, epoch: int):
        if self._epoch_cache[0] != epoch:
            if self.order == "sequential":  # shards in a per-epoch order, each read front to back
                order = np.random.default_rng([self.seed, self.source_id, epoch, 7]).permutation(len(self.names))
                order = order.tolist()
                permute = None
            else:  # every sample of the source at a pseudo-random position of the epoch
                order, permute = list(range(len(self.names))), IndexPermutation(self.total, self.seed,
                                                                                self.source_id, epoch, 7)
            starts = np.cumsum([0] + [self.counts[i] for i in order]).tolist()
            self._epoch_cache = (epoch, order, starts, permute)
        return self._epoch_cache[1:]

    def locate(self, local_index: int) -> Tuple[str, int]:
        """(shard path, sample position in that shard) of the source's local_index-th sample."""
        epoch, pos = divmod(local_index, self.total)
        order, starts, permute = self._epoch_layout(epoch)
        if permute is not None:
            pos = permute(pos)
        k = bisect.bisect_right(starts, pos) - 1
        return os.path.join(self.folder, self.names[order[k]]), pos - starts[k]

    def read(self, local_index: int):
        path, position = self.locate(local_index)
        if path not in self._offsets:  # 8 bytes per sample: a permuted epoch touches every shard
            self._offsets[path] = np.asarray(index_shard(path) if os.path.isfile(path) else [], dtype=np.int64)
        offsets = self._offsets[path]
        if position >= len(offsets):
            return ReadError("", os.path.basename(path), "sample missing from shard (truncated or unreadable)")
        return read_sample(path, int(offsets[position]), self.max_member_bytes)


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
    skipped: Dict[str, int] = field(default_factory=dict)  # SKIP_REASONS kind -> samples skipped
    bad_in_shard: Dict[str, int] = field(default_factory=dict)  # "source/shard/epoch" -> bad samples
    bad_run: List[int] = field(default_factory=list)  # per source: bad samples since its last good one

    def to_dict(self) -> dict:
        return {"step": self.step, "counts": list(self.counts), "skipped": dict(self.skipped),
                "bad_in_shard": dict(self.bad_in_shard), "bad_run": list(self.bad_run)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        counts = [int(c) for c in d["counts"]]
        return cls(int(d["step"]), counts, dict(d.get("skipped", {})), dict(d.get("bad_in_shard", {})),
                   [int(c) for c in d.get("bad_run", [0] * len(counts))])

    def copy(self) -> "LoaderState":
        return LoaderState.from_dict(self.to_dict())


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
            self._sources = [Source(p, i, self.cfg.seed, self.cfg.max_member_bytes, self.cfg.sample_order,
                                    self.cfg.max_samples_per_source) for i, p in enumerate(self.cfg.paths)]
            self._builder = self.builder_factory()
        source = self._sources[source_id]
        key = ""
        try:
            doc = source.read(local_index)
            if isinstance(doc, ReadError):
                return step, source_id, local_index, doc
            key = doc.key
            rng = np.random.default_rng([self.cfg.seed, source_id, local_index, 11])
            return step, source_id, local_index, self._builder.build(doc, rng)
        except DocumentError as e:
            error = ReadError(key, os.path.basename(source.locate(local_index)[0]), str(e), e.kind)
        except Exception as e:  # one sample never kills a run: anything else is counted and logged too
            error = ReadError(key, os.path.basename(source.locate(local_index)[0]),
                              f"{type(e).__name__}: {str(e)[:200]}", "unexpected_error")
        return step, source_id, local_index, error


_WORKER_DATASET = None


def _init_worker(cfg: LoaderConfig, builder_factory) -> None:
    global _WORKER_DATASET
    from megatron_moca.distributed.launch import init_loader_worker

    init_loader_worker()
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
        if cfg.sample_order not in SAMPLE_ORDERS:
            raise UserError(f"data.sample_order={cfg.sample_order!r}: expected one of {', '.join(SAMPLE_ORDERS)}")
        self.sources = [Source(p, i, cfg.seed, cfg.max_member_bytes, cfg.sample_order, cfg.max_samples_per_source)
                        for i, p in enumerate(cfg.paths)]
        weights = cfg.weights or [s.total for s in self.sources]
        if len(weights) != len(self.sources):
            raise UserError(f"data.weights has {len(weights)} entries for {len(self.sources)} paths")
        self.plan = Plan(weights, cfg.seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pad_id, self.image_token_id = pad_id, image_token_id
        n = len(self.sources)
        self.state = LoaderState.from_dict(state) if state else LoaderState(0, [0] * n, bad_run=[0] * n)
        self._emitted = self.state.copy()

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
        pool = ctx.Pool(self.cfg.num_workers, _init_worker, (self.cfg, self.builder_factory))
        pending = collections.deque()
        try:
            for item in plan:
                pending.append((item[3], pool.apply_async(_work, (item[:3],))))
                if len(pending) >= window:
                    before, result = pending.popleft()
                    yield before, result.get()
            # the plan is infinite: the loop above never falls through
        finally:
            # the consumer stopped (or failed): let the few samples in flight finish, then join. Pool's own
            # exit (terminate) can deadlock against its task-handler thread when it is stopped mid-stream
            pool.close()
            for _, result in pending:
                result.wait(60)
            pool.join()

    def __iter__(self):
        from megatron_moca.data.samples import GreedyPacker

        packer = GreedyPacker(self.cfg.pack_length, self.pad_id, self.cfg.pad_to_multiple, self.image_token_id)
        bad = self.state.copy()  # skip counts, carried into each emitted state
        for before, (step, source, local, sample) in self.samples():
            if not isinstance(sample, ReadError) and len(sample) > self.cfg.pack_length:
                sample = ReadError(sample.key, os.path.basename(self.sources[source].locate(local)[0]),
                                   f"longer than a packed row (pack_length {self.cfg.pack_length}); raise it or lower "
                                   "max_length", "too_long")
            if isinstance(sample, ReadError):
                self._count_bad(bad, source, local, sample)
                continue
            bad.bad_run[source] = 0
            row = packer.add(sample)
            if row is not None:
                # this sample opened the next row: resuming from it reproduces every later row
                self._emitted = LoaderState(step, before, dict(bad.skipped), dict(bad.bad_in_shard), list(bad.bad_run))
                yield row

    def _count_bad(self, bad: LoaderState, source_id: int, local: int, error: ReadError) -> None:
        """Count a skipped sample; DataError once its shard is over budget or its source yielded
        nothing usable in a whole pass (this rank's share of the source's samples)."""
        source = self.sources[source_id]
        path, _ = source.locate(local)
        shard = os.path.relpath(path, source.folder)  # as the manifest names it (merged: part-*/shard-*)
        log.warning("skipped sample %s in %s: %s", error.key or "?", path, error.reason)
        bad.skipped[error.kind] = bad.skipped.get(error.kind, 0) + 1
        bad.bad_run[source_id] += 1
        # this rank's share of a pass (at least 32 reads, or the whole source, when ranks outnumber samples)
        if bad.bad_run[source_id] >= max(-(-source.total // self.dp_size), min(source.total, 32)):
            raise DataError(f"data path {source.folder}: no usable sample in a whole pass over its {source.total} "
                            f"samples (last: {shard}: {error.reason}); check the shards with `moca data verify`")
        epoch = local // source.total
        key = f"{source_id}/{shard}/{epoch}"
        bad.bad_in_shard[key] = bad.bad_in_shard.get(key, 0) + 1
        in_shard = source.counts[source.names.index(shard)]
        allowed = self.cfg.max_bad_sample_fraction * in_shard / self.dp_size
        if bad.bad_in_shard[key] > allowed:
            raise DataError(f"{path}: {bad.bad_in_shard[key]} unusable samples of its {in_shard} (this rank's share: "
                            f"over data.max_bad_sample_fraction={self.cfg.max_bad_sample_fraction:g}), the last: "
                            f"{error.reason}; fix or drop the shard (`moca data verify`), or raise the budget")
