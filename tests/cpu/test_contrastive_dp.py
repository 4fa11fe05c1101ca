"""InfoNCE over 2 data-parallel processes (gloo): the loss is the global batch's, and each rank's
gradient equals the single-process gradient of that loss for its slice of the batch."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _batch():
    g = torch.Generator().manual_seed(7)
    q, p = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    n = torch.randn(6, 2, 16, generator=g)
    return q, p, n


def _embeddings(q, p, n):
    return F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)


def _rank(rank, world, init_file, out):
    from megatron_moca.objectives.contrastive import info_nce

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    q, p, n = _batch()
    share = q.shape[0] // world
    local = [t[rank * share:(rank + 1) * share].clone().requires_grad_(True) for t in (q, p, n)]
    loss, metrics = info_nce(*_embeddings(*local))
    loss.backward()
    torch.save({"loss": loss.item(), "grads": [t.grad for t in local], "accuracy": metrics["accuracy"]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_gathered_info_nce_equals_the_single_process_loss_and_gradients():
    from megatron_moca.objectives.contrastive import info_nce

    q, p, n = (t.clone().requires_grad_(True) for t in _batch())
    loss, metrics = info_nce(*_embeddings(q, p, n))
    loss.backward()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, os.path.join(out, "init"), out), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for r, got in enumerate(ranks):
        assert abs(got["loss"] - loss.item()) < 1e-6 and got["accuracy"] == metrics["accuracy"]
        for full, part in zip((q.grad, p.grad, n.grad), got["grads"]):
            assert torch.allclose(part, full[r * 3:(r + 1) * 3], atol=1e-6), r
