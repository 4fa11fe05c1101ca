"""RMSNorm computed the way Qwen2.5-VL computes it (statistics in fp32, cast, then scale).

torch.nn.RMSNorm (megatron's local spec) normalises in the input dtype; in bf16 that drifts from the
HF model. The constructor matches megatron's norm protocol (config, hidden_size, eps) so specs can
use it for the LLM layers, the final norm and the vision tower.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_unused):
        super().__init__()
        dtype = getattr(config, "params_dtype", None) or torch.float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
