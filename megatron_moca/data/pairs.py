"""Stage-2 training pairs: MMEB-train-style tables -> (query, positive, hard negatives) and the order in
which global batches visit them (spec moca-method.md, "Stage 2").

    data.paths entries:  a table (.jsonl / .parquet)              -> one subset, named after the file
                         a folder of tables                       -> one subset, named after the folder
                         a folder of subset folders (MMEB-train)  -> one subset per folder
    columns:             qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path
                         (neg_* lists, or lists written as strings: read with ast.literal_eval, never eval)

Texts use Phi-3-V's `<|image_1|>` where the image goes (as MMEB-train does); a row without an image
drops it. Image paths are relative to data.image_root (default: the entry's folder) and may not leave it
(absolute paths, '..' and symbolic links out of it are refused - real paths are compared -, naming the
row, unless data.allow_images_outside_root). Every
image is checked (a regular file within data.max_image_bytes whose header PIL reads) when the tables
are read; a row with an unusable image is skipped and counted by reason (the reference substitutes a
blank image instead: that trains the text to match a blank picture). Each subset is capped at
data.max_rows_per_subset rows (the first ones). Text-only pair sets (E5-style) are the same columns
with empty image paths.
"""

from __future__ import annotations

import ast
import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_moca.data.documents import LONE_SURROGATE, valid_unicode
from megatron_moca.data.files import MAX_IMAGE_BYTES, confined_path, file_problem, image_file_problem
from megatron_moca.data.image_processing import ImageProcessingConfig
from megatron_moca.errors import UserError

log = logging.getLogger(__name__)

SAMPLERS = ("mixed", "single_task")
TABLE_EXTS = (".jsonl", ".parquet")

Side = Tuple[str, Optional[str]]  # (text, absolute image path or None)


@dataclass
class PairsDataConfig:
    """Where the stage-2 pairs are and how batches are drawn from them."""

    paths: List[str] = field(default_factory=list)
    """Pair tables: files, folders of tables, or folders of subset folders (MMEB-train layout)."""
    image_root: Optional[str] = None
    """Folder the *_image_path columns are relative to (default: each data.paths entry's folder)."""
    allow_images_outside_root: bool = False
    """Accept absolute image paths and paths that leave image_root by '..' or by a symbolic link (refused by
    default: confinement compares real paths)."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """Largest image file read; rows naming a larger one are skipped and counted."""
    max_rows_per_subset: int = 50000
    """Rows read per subset (the first ones; the reference caps every subset at 50k)."""
    sampler: str = "mixed"
    """`mixed`: global batches drawn from all subsets together; `single_task`: every global batch
    from one subset (the reference's comment; its code mixes)."""
    seed: int = 42
    """Seed of the batch order (epoch e shuffles with seed + e)."""
    max_length: int = 1280
    """Tokens per query / document (longer ones are cut)."""
    image: ImageProcessingConfig = field(default_factory=ImageProcessingConfig)
    """Resizing of the images (MoCa: 256..1024 visual tokens)."""
    num_workers: int = 2
    """Data-loader worker processes per rank building the next steps' inputs (0: in the training process)."""


@dataclass
class Pair:
    subset: int
    query: Side
    positive: Side
    negatives: List[Side]


def _tables(path: str) -> List[Tuple[str, List[str]]]:
    """(subset name, its table files) under one data.paths entry."""
    if os.path.isfile(path):
        if not path.endswith(TABLE_EXTS):
            raise UserError(f"data.paths: {path} is not a .jsonl or .parquet table")
        return [(os.path.basename(path).split(".")[0], [path])]
    if not os.path.isdir(path):
        problem = file_problem(path, 0)
        raise UserError(f"data.paths: {path} " + ("does not exist" if problem in (None, "missing") else
                                                   f"is {problem}: name a table or a folder"))

    def tables_in(folder):
        return sorted(f for ext in TABLE_EXTS for f in glob.glob(os.path.join(folder, "*" + ext)))

    direct = tables_in(path)
    if direct:
        return [(os.path.basename(os.path.normpath(path)), direct)]
    found = [(name, tables_in(os.path.join(path, name))) for name in sorted(os.listdir(path))
             if os.path.isdir(os.path.join(path, name))]
    found = [(name, files) for name, files in found if files]
    if not found:
        raise UserError(f"data.paths: {path} holds no .jsonl / .parquet tables, directly or in subset folders")
    return found


def _as_list(value, where: str, column: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [value] if text else []
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # deep or huge literals too
            raise UserError(f"{where}: {column} looks like a list but does not parse: {text[:80]!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {column} must be a list of strings")
    return list(value)


def _fill_empty_negatives(texts: List[str], positive: str, rng: np.random.Generator) -> List[str]:
    """The MoCa reference's rule for hard negatives without text (haon-chen/MoCa src/dataset.py,
    TaskBatchDataset.__getitem__): when every negative's text is empty (image negatives that share the
    positive's instruction) each takes the positive's text; otherwise an empty one takes one of the
    non-empty negative texts - drawn per row from a seeded generator, where the reference draws
    unseeded - instead of becoming a bare image placeholder."""
    if "" not in texts:
        return texts
    filled = [t for t in texts if t]
    if not filled:
        return [positive] * len(texts)
    return [t or filled[int(rng.integers(len(filled)))] for t in texts]


def _rank_and_world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gathered(value, world: int) -> list:
    """Every rank's `value` (a plain object), in rank order (collective)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


class PairsData:
    """Every pair of every subset, in memory (texts and image paths only)."""

    def __init__(self, cfg: PairsDataConfig):
        if not cfg.paths:
            raise UserError("data.paths is empty: name at least one pairs table or folder")
        self.cfg = cfg
        self.subsets: List[str] = []
        self.pairs: List[Pair] = []
        self.skipped: Dict[str, int] = {}
        """Rows dropped for an unusable image, by reason."""
        self._where: List[str] = []  # file:line of each pair, for messages
        seen: Dict[str, str] = {}
        for entry in cfg.paths:
            root = cfg.image_root or (entry if os.path.isdir(entry) else os.path.dirname(entry))
            for name, files in _tables(entry):
                if name in seen:
                    raise UserError(f"data.paths: subset {name} appears twice ({seen[name]} and {entry})")
                seen[name] = entry
                self._read_subset(name, files, root, cfg.max_rows_per_subset)
        self._drop_rows_with_unusable_images()

    def _read_subset(self, name: str, files: Sequence[str], root: str, cap: int) -> None:
        from megatron_moca.eval.beir import table_rows

        index = len(self.subsets)
        self.subsets.append(name)
        count = 0
        for path in files:
            for n, row in table_rows(path):
                where = f"{path}:{n}"
                for column in ("qry", "pos_text"):
                    if column not in row:
                        raise UserError(f"{where}: no {column} column (MMEB-train columns: qry, qry_image_path, "
                                        "pos_text, pos_image_path, neg_text, neg_image_path)")
                texts = _as_list(row.get("neg_text"), where, "neg_text")
                images = _as_list(row.get("neg_image_path"), where, "neg_image_path")
                if texts and images and len(texts) != len(images):
                    raise UserError(f"{where}: {len(texts)} neg_text entries but {len(images)} neg_image_path entries")
                width = max(len(texts), len(images))
                texts, images = texts or [""] * width, images or [""] * width
                texts = _fill_empty_negatives(texts, row["pos_text"] or "",
                                              np.random.default_rng([self.cfg.seed, index, count]))
                self.pairs.append(Pair(index, self._side(row["qry"], row.get("qry_image_path"), root, where),
                                       self._side(row["pos_text"], row.get("pos_image_path"), root, where),
                                       [self._side(t, i, root, where) for t, i in zip(texts, images)]))
                self._where.append(where)
                count += 1
                if count >= cap:
                    return
        if not count:
            raise UserError(f"subset {name}: its tables have no rows")

    def _side(self, text, image, root: str, where: str) -> Side:
        if text is not None and not isinstance(text, str):
            raise UserError(f"{where}: texts must be strings, got {type(text).__name__}")
        if image is not None and not isinstance(image, str):
            raise UserError(f"{where}: image paths must be strings, got {type(image).__name__}")
        if text and not valid_unicode(text):
            raise UserError(f"{where}: {LONE_SURROGATE}")
        if not image:
            return text or "", None
        return text or "", confined_path(root, image, where, self.cfg.allow_images_outside_root,
                                         "data.allow_images_outside_root")

    def _drop_rows_with_unusable_images(self) -> None:
        """Check every distinct image once (threads: header reads wait on storage), then drop the rows
        that name an unusable one, counting them by reason; a subset left empty is an error. Under torch
        distributed each rank checks a 1/world share of the images and the ranks exchange what they found
        (collective), so the file system sees every header once per job, not once per rank."""
        from concurrent.futures import ThreadPoolExecutor

        paths = sorted({path for p in self.pairs for _, path in (p.query, p.positive, *p.negatives) if path})
        rank, world = _rank_and_world()
        mine = paths[rank::world]
        with ThreadPoolExecutor(max_workers=16) as pool:
            found = dict(zip(mine, pool.map(
                lambda path: image_file_problem(path, self.cfg.max_image_bytes, self.cfg.image), mine)))
        problems = dict.fromkeys(paths)
        for share in _all_gathered({path: why for path, why in found.items() if why}, world):
            problems.update(share)
        kept, where_kept = [], []
        for pair, where in zip(self.pairs, self._where):
            bad = next((path for _, path in (pair.query, pair.positive, *pair.negatives) if path and problems[path]),
                       None)
            if bad is None:
                kept.append(pair)
                where_kept.append(where)
                continue
            reason = "image " + problems[bad].split(" (")[0]
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            if sum(self.skipped.values()) <= 5:
                log.warning("skipped %s: %s: %s", where, bad, problems[bad])
        if self.skipped:
            log.warning("skipped %d of %d pairs for unusable images: %s", len(self.pairs) - len(kept),
                        len(self.pairs), ", ".join(f"{n} {reason}" for reason, n in self.skipped.items()))
        self.pairs, self._where = kept, where_kept
        empty = [name for name, size in zip(self.subsets, self.subset_sizes()) if not size]
        if empty:
            raise UserError(f"subset {empty[0]}: every row was skipped for an unusable image "
                            f"({', '.join(f'{n} {r}' for r, n in self.skipped.items())}); check data.image_root")

    def subset_sizes(self) -> List[int]:
        sizes = [0] * len(self.subsets)
        for p in self.pairs:
            sizes[p.subset] += 1
        return sizes

    def fingerprint(self) -> Dict[str, int]:
        """Rows per subset: what a resumed run must find again."""
        return dict(zip(self.subsets, self.subset_sizes()))


class BatchPlan:
    """Which pairs form global batch `step` (over all data-parallel ranks): a pure function of the
    subset sizes, the batch size, the sampler and the seed, so a resumed run continues the same order.
    Epoch e is a fresh shuffle (seed + e); incomplete batches at the end of an epoch are dropped."""

    def __init__(self, subset_sizes: Sequence[int], global_batch: int, sampler: str, seed: int):
        if sampler not in SAMPLERS:
            raise UserError(f"data.sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        self.sizes, self.global_batch, self.sampler, self.seed = list(subset_sizes), global_batch, sampler, seed
        self._epoch, self._batches = -1, []
        self.steps_per_epoch = (sum(self.sizes) // global_batch if sampler == "mixed"
                                else sum(n // global_batch for n in self.sizes))
        if self.steps_per_epoch == 0:
            what = "all subsets together" if sampler == "mixed" else "any single subset (data.sampler=single_task)"
            raise UserError(f"train.global_batch_size={global_batch} is larger than {what} "
                            f"({max(self.sizes) if sampler != 'mixed' else sum(self.sizes)} pairs)")

    def _plan(self, epoch: int) -> List[np.ndarray]:
        rng = np.random.default_rng(self.seed + epoch)
        b = self.global_batch
        if self.sampler == "mixed":
            order = rng.permutation(sum(self.sizes))
            return [order[i * b:(i + 1) * b] for i in range(self.steps_per_epoch)]
        batches, offset = [], 0
        for n in self.sizes:
            order = offset + rng.permutation(n)
            batches += [order[i * b:(i + 1) * b] for i in range(n // b)]
            offset += n
        return [batches[i] for i in rng.permutation(len(batches))]

    def global_batch_at(self, step: int) -> np.ndarray:
        """Pair indices of the global batch of `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
        return self._batches[within]

    def local_batch_at(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """This data-parallel rank's consecutive slice of the global batch."""
        batch = self.global_batch_at(step)
        per = len(batch) // dp_size
        return batch[dp_rank * per:(dp_rank + 1) * per]
