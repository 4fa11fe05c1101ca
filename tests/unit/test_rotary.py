"""The ViT rotary's few-kernel path equals HF's fp32 chain bit for bit, forward and backward."""

import pytest
import torch

from megatron_moca.models.rotary import half_rotary, rotary_qkv, rotary_reference


def _hf_qkv(qkv, cos, sin):
    """HF's tower: q and k rotated in fp32 from the QKV projection, v selected."""
    q, k = rotary_reference(qkv[:, :, :2], cos, sin).unbind(2)
    return q, k, qkv[:, :, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("used", ["qkv", "qk"])  # with v unused its gradient arrives as None
def test_rotary_qkv_is_bit_identical_to_hf_math(dtype, used):
    g = torch.Generator().manual_seed(0)
    n, heads, d = 300, 4, 40
    qkv = torch.randn(n, heads, 3, d, generator=g).to(dtype).requires_grad_()
    angles = torch.randn(n, d // 2, generator=g)[:, None, None, :] * 50  # large angles: rounding matters
    cos, sin = angles.cos(), angles.sin()
    upstream = torch.randn(3, n, heads, d, generator=g).to(dtype)

    outs, grads = [], []
    for fn in (_hf_qkv, rotary_qkv):
        qkv.grad = None
        q, k, v = fn(qkv, cos, sin)
        loss = (q * upstream[0]).sum() + (k * upstream[1]).sum()
        if used == "qkv":
            loss = loss + (v * upstream[2]).sum()
        loss.backward()
        outs.append(torch.stack([q, k, v]).detach())
        grads.append(qkv.grad.clone())
    assert outs[1].dtype == dtype and outs[1].shape == (3, n, heads, d)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    assert grads[1].shape == qkv.shape and bool(grads[1][:, :, :2].ne(0).any())
    assert bool(grads[1][:, :, 2].eq(0).all()) == (used == "qk")
    assert not torch.equal(outs[1][:2], qkv[:, :, :2].detach().movedim(2, 0))  # it did rotate
    assert torch.equal(outs[1][2], qkv[:, :, 2].detach())


def test_half_rotary_takes_a_head_dimension_that_is_not_innermost():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, 3, generator=g).transpose(0, 2)  # [3, 5, 16], last-dim stride 15
    angles = torch.randn(3, 5, 8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    assert x.stride(-1) != 1
    assert torch.equal(half_rotary(x, cos, sin), rotary_reference(x, cos, sin))
