#!/usr/bin/env python
"""Peak host memory per rank while stage 2 builds its FSDP2 model, two ways, on gloo ranks (CPU):

    python tools/bench_host_rss.py [--layers 16] [--hidden 1024] [--ranks 2] [--out /tmp/bench_host_rss]

  every rank loads   each rank reads the whole HF folder into an fp32 model on the host, then fully_shard
                     keeps its share (the way before issue 13: 8 ranks x 33 GB for a 7B on one node)
  rank 0 loads       training/finetune.py's way: rank 0 reads the folder, the other ranks build the model on
                     the meta device and receive their shards and the buffers from rank 0
                     (fsdp.meta_model, fsdp.load_from_rank0)

Both run the project's own functions on a random Qwen2.5-VL written as a stage-1 export would be (bf16
safetensors), in fresh processes so that each peak is its own. Printed per rank: the resident set before
loading (imports, process group), the peak above it while loading and sharding (ru_maxrss), what stays
resident, the peak once one forward has run (FSDP gathers each unit: the same either way), and the ratios; the sharded models'
embeddings of one input are compared (the same weights either way). On a GPU the saving is larger still
(the shards go to the device); that is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("every rank loads", "rank 0 loads")


def write_model(folder: str, layers: int, hidden: int) -> int:
    """A random model of the tiny preset's vision tower and a `layers` x `hidden` language model; returns its
    parameter count."""
    import torch

    from megatron_moca.config.model import preset
    from megatron_moca.conversion.random_hf import hf_shapes, write_random_hf

    cfg = preset("tiny")
    lang = cfg.language
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = layers, hidden, 8, 2
    lang.ffn_hidden_size = hidden * 11 // 4
    half = hidden // 8 // 2  # M-RoPE sections split head_dim / 2 as Qwen2.5-VL does (16, 24, 24 of 64)
    lang.mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_random_hf(folder, cfg, torch.bfloat16, seed=0)
    shapes = hf_shapes(cfg)
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, world: int, mode: str, folder: str, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_moca.conversion.hf_io import load_transformers_model
    from megatron_moca.embed.inputs import EmbeddingInputs
    from megatron_moca.training import fsdp
    from megatron_moca.training.contrastive_step import PooledEncoder

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    device = torch.device("cpu")
    before = rss_bytes()
    if mode == "rank 0 loads" and rank != 0:
        model = fsdp.meta_model(folder)
    else:
        model = load_transformers_model(folder, torch.float32)
    encoder = PooledEncoder(model.model, device, always_run_vision=True)
    full_state = dict(encoder.state_dict()) if rank == 0 or mode == "every rank loads" else {}
    fsdp.shard(encoder, device, "float32")
    if mode == "rank 0 loads":
        fsdp.load_from_rank0(encoder, full_state, device)
    del full_state
    loaded, peak = rss_bytes(), peak_rss_bytes()
    with torch.no_grad():
        vector = encoder(EmbeddingInputs(None, max_length=32).batch(["a harbour at dawn"]))
    dist.barrier()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"before": before, "peak": peak, "loaded": loaded, "forward_peak": peak_rss_bytes(),
                   "vector": vector.flatten().tolist()}, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_host_rss")
    args = parser.parse_args(argv)
    folder = os.path.join(args.out, f"model_{args.layers}x{args.hidden}")
    os.makedirs(args.out, exist_ok=True)
    params = write_model(folder, args.layers, args.hidden)
    print(f"random Qwen2.5-VL, {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.0f} MiB in fp32), "
          f"{args.ranks} gloo ranks")
    results = {}
    for i, mode in enumerate(MODES):
        out = os.path.join(args.out, f"result_{i}")
        rdzv = os.path.join(args.out, f"rdzv_{i}")
        if os.path.exists(rdzv):
            os.remove(rdzv)
        mp.spawn(worker, args=(args.ranks, mode, folder, f"file://{rdzv}", out), nprocs=args.ranks)
        results[mode] = [json.load(open(f"{out}.{rank}")) for rank in range(args.ranks)]
    mib = 2**20
    print("| loading | rank | RSS before loading | peak while loading (above it) | resident after | peak with one forward |")
    print("|---|---|---|---|---|---|")
    for mode, ranks in results.items():
        for rank, r in enumerate(ranks):
            print(f"| {mode} | {rank} | {r['before'] / mib:.0f} MiB | {(r['peak'] - r['before']) / mib:.0f} MiB | "
                  f"{(r['loaded'] - r['before']) / mib:.0f} MiB | {(r['forward_peak'] - r['before']) / mib:.0f} MiB |")
    for rank in range(args.ranks):
        old, new = ((results[m][rank]["peak"] - results[m][rank]["before"]) for m in MODES)
        print(f"rank {rank}: peak while loading {old / mib:.0f} -> {new / mib:.0f} MiB ({old / max(new, 1):.2f}x)")
    old, new = (sum(r["peak"] - r["before"] for r in results[m]) for m in MODES)
    print(f"all {args.ranks} ranks: {old / mib:.0f} -> {new / mib:.0f} MiB ({old / max(new, 1):.2f}x)")
    same = all(results[MODES[0]][r]["vector"] == results[MODES[1]][r]["vector"] for r in range(args.ranks))
    print(f"the sharded models embed the same input identically: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
