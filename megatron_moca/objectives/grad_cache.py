"""Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): a contrastive loss over a batch far larger than fits in memory, with the exact gradient.

    1. embed every chunk without a graph (activations of one chunk at a time), remembering RNG states;
    2. compute the loss on the detached embeddings and backpropagate it to them only: d loss / d emb;
    3. embed each chunk again, now with a graph, under the same RNG states (same dropout masks), and
       backpropagate the cached d loss / d emb through it; parameter gradients accumulate chunk by chunk.

The result equals backpropagating the loss of the whole batch (tested), at the memory of one chunk and
the cost of one extra forward. `no_sync` (e.g. DDP's) defers the gradient reduction to the last chunk.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch


class _RngState:
    """The CPU and CUDA generator states at one moment, to replay a forward pass with the same draws."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class GradCache:
    """encode(chunk) -> [n, d] embeddings of one chunk of inputs; loss_fn(*group_embeddings) -> scalar,
    one argument per group (e.g. queries, positives, hard negatives), each the concatenation of its chunks."""

    def __init__(self, encode: Callable[[Any], torch.Tensor], loss_fn: Callable[..., Any],
                 no_sync: Optional[Callable[[], Any]] = None):
        self.encode, self.loss_fn, self.no_sync = encode, loss_fn, no_sync

    def step(self, groups: Sequence[Sequence[Any]]) -> Tuple[torch.Tensor, Any]:
        """Forward + backward of the whole batch; returns (detached loss, whatever else loss_fn returned)."""
        states: List[List[_RngState]] = []
        cached: List[torch.Tensor] = []
        with torch.no_grad():
            for chunks in groups:
                group_states, parts = [], []
                for chunk in chunks:
                    group_states.append(_RngState())
                    parts.append(self.encode(chunk))
                states.append(group_states)
                cached.append(torch.cat(parts).detach().requires_grad_(True))
        out = self.loss_fn(*cached)
        loss, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        loss.backward()  # reaches the cached embeddings only: they are leaves
        last = (len(groups) - 1, len(groups[-1]) - 1)
        for g, chunks in enumerate(groups):
            offset = 0
            for c, chunk in enumerate(chunks):
                sync = (g, c) == last or self.no_sync is None
                with (contextlib.nullcontext() if sync else self.no_sync()), states[g][c].replay():
                    embeddings = self.encode(chunk)
                    grad = cached[g].grad[offset:offset + embeddings.shape[0]]
                    embeddings.backward(grad)
                offset += embeddings.shape[0]
        return loss.detach(), (extra[0] if len(extra) == 1 else extra)
