"""NCCL's rule that every rank issues the same collectives with the same shapes, enforced on gloo for this tier
(conftest.py): shown live on a deliberate mismatch (without the checker gloo lets one rank return), and
held by the sharded evaluation's gather, whose shares differ by rank and are padded to one shape."""

import json
import os

import torch


def _mismatch_worker(rank, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        dist.all_reduce(torch.zeros(3 if rank == 0 else 4))
        result = "returned"
    except RuntimeError as e:
        result = str(e).splitlines()[0]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def test_a_collective_whose_shapes_differ_between_ranks_fails_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    assert os.environ["TORCH_DISTRIBUTED_DEBUG"] == "DETAIL"
    out = str(tmp_path / "result")
    mp.spawn(_mismatch_worker, args=(f"file://{tmp_path / 'rdzv'}", out), nprocs=2)
    for rank in range(2):
        assert json.load(open(f"{out}.{rank}")).startswith("Detected mismatch between collectives on ranks")


def _gather_worker(rank, init, out):
    import torch.distributed as dist

    from megatron_moca.eval.sharding import ShardedEmbedder

    class Embedder:
        dimension, device = 4, torch.device("cpu")

        def embed(self, items, batch_size=8, progress=None):
            return torch.tensor([[float(i)] * 4 for i in items]).reshape(len(items), 4)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=3)
    try:
        gathered = ShardedEmbedder(Embedder()).embed(list(range(7)))  # shares of 2, 2 and 3 items
        torch.save(gathered, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_sharded_gather_issues_one_shape_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "gathered")
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'rdzv'}", out), nprocs=3)
    for rank in range(3):
        assert torch.equal(torch.load(f"{out}.{rank}"), torch.arange(7.0)[:, None].expand(7, 4))
