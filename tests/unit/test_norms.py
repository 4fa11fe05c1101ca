"""RMSNorm equals HF's Qwen2RMSNorm arithmetic bit for bit on the CPU, forward and backward."""

import pytest
import torch

from megatron_moca.models.norms import RMSNorm


def hf_rms_norm(weight, x, eps):
    """transformers' Qwen2RMSNorm.forward, written out."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_hf_arithmetic(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(None, 96, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    x = (3 * torch.randn(50, 96, generator=g)).to(dtype).requires_grad_()
    upstream = torch.randn(50, 96, generator=g).to(dtype)
    results = []
    for fn in (lambda t: hf_rms_norm(norm.weight, t, 1e-6), norm):
        x.grad, norm.weight.grad = None, None
        out = fn(x)
        out.backward(upstream)
        results.append((out.detach(), x.grad.clone(), norm.weight.grad.clone()))
    for ref, got in zip(*results):
        assert got.dtype == ref.dtype and torch.equal(got, ref)
