"""The vision tower's rotary embedding: HF's fp32 arithmetic, bit for bit, in a few kernels.

HF (and the reference below) computes `(x.float() * cat(cos, cos) + rotate_half(x.float()) * cat(sin, sin))
.to(dtype)`: a float copy, a negation and a `cat` for rotate_half, three multiply/add passes and a
cast, all over fp32 tensors of the size of q and k, and as many again backward. Because cos and sin
repeat over the two halves of the head dimension, each half of the output is one fp32 product pair:

    out[:d/2] = x1 * cos - x2 * sin          out[d/2:] = x2 * cos + x1 * sin

so forward and backward are four kernels each: two products (the bf16 input is promoted inside the
kernel, never copied to fp32) and a subtraction and an addition written straight into the output dtype.
Each output element is rounded exactly as in HF's chain (same products, same single sum, same final
cast), so results are bit-identical. Under torch.compile the reference expression is traced instead
(inductor fuses it into one kernel anyway).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's formula; cos/sin hold one half ([..., d/2], broadcastable against x [..., d])."""
    xf = x.float()
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def _combine(products_cos, products_sin, dtype, forward: bool) -> torch.Tensor:
    """out[0] = pc[0] -/+ ps[1], out[1] = pc[1] +/- ps[0] over the halves axis (-2), rounded to dtype."""
    out = torch.empty(products_cos.shape, dtype=dtype, device=products_cos.device)
    first, second = (torch.sub, torch.add) if forward else (torch.add, torch.sub)
    first(products_cos[..., 0, :], products_sin[..., 1, :], out=out[..., 0, :])
    second(products_cos[..., 1, :], products_sin[..., 0, :], out=out[..., 1, :])
    return out


class _HalfRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        halves = x.unflatten(-1, (2, -1))  # [..., 2, d/2]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        ctx.save_for_backward(cos, sin)
        return _combine(halves * cos, halves * sin, x.dtype, forward=True).flatten(-2)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        halves = grad.unflatten(-1, (2, -1))
        # the transpose of the rotation: d/dx1 = g1 cos + g2 sin, d/dx2 = g2 cos - g1 sin
        return _combine(halves * cos, halves * sin, grad.dtype, forward=False).flatten(-2), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] by angles whose cos/sin ([..., d/2], fp32, no gradient) repeat over both halves."""
    if torch.compiler.is_compiling():
        return rotary_reference(x, cos, sin)
    return _HalfRotary.apply(x, cos, sin)
