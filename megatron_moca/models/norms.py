"""RMSNorm computed the way Qwen2.5-VL computes it (statistics in fp32, cast, then scale).

torch.nn.RMSNorm (megatron's local spec) normalises in the input dtype; in bf16 that drifts from the
HF model. The constructor matches megatron's norm protocol (config, hidden_size, eps) so specs can
use it for the LLM layers, the final norm and the vision tower.

The normalisation goes through `F.rms_norm` on the input as it is: for bf16/fp16 inputs torch computes
in fp32 and rounds once, which is HF's `x.float()` ... `.to(dtype)`. On CUDA (torch >= 2.9) that is one
fused kernel forward and one backward instead of HF's cast / pow / mean / add / rsqrt / mul / cast
chain and its gradient (a dozen launches per norm, 64 norms in the vision tower alone); on the CPU
it is that same chain, bit for bit (tests/unit/test_norms.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_unused):
        super().__init__()
        dtype = getattr(config, "params_dtype", None) or torch.float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
