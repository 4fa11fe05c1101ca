"""objectives/grad_cache.py: chunked embedding with cached gradients equals backpropagating the whole batch,
dropout included (RNG replay), with the reduction hook deferred to the last chunk."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_moca.objectives.contrastive import ContrastiveConfig, info_nce
from megatron_moca.objectives.grad_cache import GradCache


def setup(dropout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(dropout), nn.Tanh(), nn.Linear(32, 8))
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(24, 8, generator=g)
    return model, batch


def loss_fn(q, p, n):
    return info_nce(q, p, n.view(q.shape[0], 2, -1), ContrastiveConfig(temperature=0.05))


def chunks(x, size):
    return list(x.split(size))


def test_cached_gradients_equal_the_whole_batch_with_dropout():
    model, (q, p, n) = setup(dropout=0.2)
    encode = lambda x: F.normalize(model(x), dim=-1)

    torch.manual_seed(5)  # reference: the same chunks in the same order (same dropout draws), one graph
    embedded = [torch.cat([encode(c) for c in chunks(t, s)]) for t, s in ((q, 4), (p, 4), (n, 8))]
    ref_loss, _ = loss_fn(*embedded)
    ref_loss.backward()
    ref = [w.grad.clone() for w in model.parameters()]
    model.zero_grad()

    torch.manual_seed(5)
    loss, metrics = GradCache(encode, loss_fn).step([chunks(q, 4), chunks(p, 4), chunks(n, 8)])
    assert abs(loss.item() - ref_loss.item()) < 1e-6 and "accuracy" in metrics
    for got, want in zip((w.grad for w in model.parameters()), ref):
        assert torch.allclose(got, want, atol=1e-6)


def test_without_dropout_any_chunking_gives_the_full_batch_gradient():
    model, (q, p, n) = setup(dropout=0.0)
    encode = lambda x: F.normalize(model(x), dim=-1)
    loss, _ = loss_fn(encode(q), encode(p), encode(n))
    loss.backward()
    ref = [w.grad.clone() for w in model.parameters()]
    model.zero_grad()
    calls = []

    @contextlib.contextmanager
    def no_sync():
        calls.append(1)
        yield

    GradCache(encode, loss_fn, no_sync=no_sync).step([chunks(q, 5), chunks(p, 12), chunks(n, 7)])
    assert len(calls) == 3 + 1 + 4 - 1  # every chunk's backward but the last one defers the reduction
    for got, want in zip((w.grad for w in model.parameters()), ref):
        assert torch.allclose(got, want, atol=1e-6)
