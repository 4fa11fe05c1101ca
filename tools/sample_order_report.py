"""Stage-1 sample order, before (`sequential`) and after (`permuted`): how many distinct shards and
input files one global batch of the 3B recipe reads, and the loader's raw read throughput for each order.

    python tools/sample_order_report.py --demo moca_demo/shards [--shards 16]

Part 1 is the plan alone (no data): a corpus of --corpus-shards shards x --docs-per-shard documents,
each shard written from consecutive documents of --files-per-shard input files (what `moca data
prepare` writes), and the recipe's global batch in documents (704 rows x 12,800 tokens / the demo's mean
document length). Part 2 reads the demo corpus, re-written into --shards shards, in both orders in this
process (the same samples, read through the .idx; no decoding) and prints samples/s and the ratio.
"""

import argparse
import json
import os
import sys
import tempfile
import time


def plan_report(shards: int, docs_per_shard: int, files_per_shard: int, batch_docs: int, batches: int = 3):
    from megatron_moca.data.loader import Source

    class PlanOnly(Source):  # Source's plan without a folder on disk
        def __init__(self, order):
            self.folder, self.source_id, self.seed, self.order = "corpus", 0, 1234, order
            self.names = [f"shard-{i:06d}.tar" for i in range(shards)]
            self.counts = [docs_per_shard] * shards
            self.total = shards * docs_per_shard
            self._epoch_cache = (-1, [], [], None)

    rows = []
    for order in ("sequential", "permuted"):
        source = PlanOnly(order)
        shard_counts, file_counts = [], []
        for b in range(batches):
            touched = [source.locate(b * batch_docs + j) for j in range(batch_docs)]
            shard_counts.append(len({path for path, _ in touched}))
            file_counts.append(len({(path, pos * files_per_shard // docs_per_shard) for path, pos in touched}))
        rows.append((order, sum(shard_counts) / batches, sum(file_counts) / batches))
    return rows


def read_report(demo: str, shards: int, samples: int):
    from megatron_moca.data.loader import Source
    from megatron_moca.data.shards import MANIFEST, ShardWriter, read_shard

    manifest = json.load(open(os.path.join(demo, MANIFEST)))
    docs = [d for s in manifest["shards"] for d in read_shard(os.path.join(demo, s["name"]))]
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    folder = tempfile.mkdtemp(prefix="moca_order_")
    writer = ShardWriter(folder, max_shard_bytes=total_bytes // shards + 1)
    for doc in docs:
        writer.write(doc)
    written = writer.close()
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"shards": [vars(s) for s in written]}, f)
    rows = []
    for order in ("sequential", "permuted", "sequential", "permuted"):  # twice each: the page cache is warm
        source = Source(folder, 0, 1234, order=order)
        t0 = time.perf_counter()
        for j in range(samples):
            source.read(j)
        rows.append((order, samples / (time.perf_counter() - t0)))
    return len(written), len(docs), rows[2:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="moca_demo/shards", help="the demo shards (moca data demo)")
    parser.add_argument("--shards", type=int, default=16, help="shards to re-write the demo corpus into")
    parser.add_argument("--samples", type=int, default=2000, help="samples read per order")
    parser.add_argument("--corpus-shards", type=int, default=2000)
    parser.add_argument("--docs-per-shard", type=int, default=6000)
    parser.add_argument("--files-per-shard", type=int, default=2)
    args = parser.parse_args(argv)
    totals = json.load(open(os.path.join(args.demo, "manifest.json")))["totals"]
    mean_tokens = min(1280, (totals["text_tokens"] + totals["image_tokens"]) / totals["samples"])
    batch_docs = int(704 * 12800 / mean_tokens)
    print(f"3B recipe global batch: 704 rows x 12,800 tokens / {mean_tokens:.0f} tokens per document = "
          f"{batch_docs} documents; corpus {args.corpus_shards} shards x {args.docs_per_shard} documents, "
          f"{args.files_per_shard} input files per shard")
    print("| order | distinct shards per global batch | distinct input files per global batch |")
    print("|---|---|---|")
    for order, shards, files in plan_report(args.corpus_shards, args.docs_per_shard, args.files_per_shard, batch_docs):
        print(f"| {order} | {shards:.0f} | {files:.0f} |")
    n_shards, n_docs, rows = read_report(args.demo, args.shards, args.samples)
    print(f"\nraw sample reads (no decoding) of the demo corpus re-written into {n_shards} shards ({n_docs} documents), "
          f"{args.samples} samples per order, one process, warm page cache:")
    print("| order | samples/s |")
    print("|---|---|")
    for order, rate in rows:
        print(f"| {order} | {rate:.0f} |")
    print(f"permuted / sequential: {rows[1][1] / rows[0][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
