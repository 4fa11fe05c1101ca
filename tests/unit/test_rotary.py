"""The ViT rotary's few-kernel path equals HF's fp32 chain bit for bit, forward and backward."""

import pytest
import torch

from megatron_moca.models.rotary import apply_rotary, rotary_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_rotary_is_bit_identical_to_hf_math(dtype):
    g = torch.Generator().manual_seed(0)
    n, heads, d = 300, 4, 40
    qkv = torch.randn(n, heads, 3, d, generator=g).to(dtype).requires_grad_()
    angles = torch.randn(n, d // 2, generator=g)[:, None, None, :] * 50  # large angles: rounding matters
    cos, sin = angles.cos(), angles.sin()
    upstream = torch.randn(n, heads, 2, d, generator=g).to(dtype)

    outs, grads = [], []
    for fn in (rotary_reference, apply_rotary):
        qkv.grad = None
        out = fn(qkv[:, :, :2], cos, sin)  # a strided view, as in the model
        out.backward(upstream)
        outs.append(out.detach())
        grads.append(qkv.grad.clone())
    assert outs[1].dtype == dtype and outs[1].shape == (n, heads, 2, d)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    assert bool(grads[1][:, :, 2].eq(0).all()) and bool(grads[1][:, :, :2].ne(0).any())  # v untouched
    assert not torch.equal(outs[1], qkv[:, :, :2].detach())  # it did rotate



def test_half_rotary_takes_a_head_dimension_that_is_not_innermost():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, 3, generator=g).transpose(0, 2)  # [3, 5, 16], last-dim stride 15
    angles = torch.randn(3, 5, 8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    assert x.stride(-1) != 1
    assert torch.equal(apply_rotary(x, cos, sin), rotary_reference(x, cos, sin))
