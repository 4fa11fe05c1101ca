"""Rotary embeddings in a few kernels, bit-identical to the chains they replace.

Both towers rotate with angles that repeat over the two halves of the head dimension (HF's
`cat(freqs, freqs)`; M-RoPE picks its sections identically in both halves), so each half of the
output is one product pair:

    out[:d/2] = x1 * cos - x2 * sin          out[d/2:] = x2 * cos + x1 * sin

Forward and backward are then four kernels each: two products and a subtraction and an addition
written straight into the output dtype. The usual chain (`x * cat(cos, cos) + rotate_half(x) *
cat(sin, sin)`) adds a negation, a `cat`, a separate add and, for fp32 math on bf16 tensors, two
casts, each a full pass over q and k, and as many again backward. Every output element is rounded
as in that chain (same products, same single sum, same final rounding):
  - vision tower: HF computes in fp32 (`x.float()`, fp32 cos/sin) and casts back; here the bf16 input
    meets fp32 cos/sin inside the product kernels (promotion, no fp32 copy of x);
  - language model: megatron-core (`rope_utils._apply_rotary_pos_emb_bshd`) and HF compute in the input
    dtype with cos/sin cast to it; here the same, with cos/sin computed once per forward instead of
    twice per layer (compat.route_megatron_rotary routes megatron's attention here).
Under torch.compile the original chains are traced instead (inductor fuses them into one kernel).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's vision-tower formula (fp32 math); cos/sin hold one half ([..., d/2], broadcastable to x)."""
    xf = x.float()
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def _rotate_into(halves, cos, sin, out: torch.Tensor, forward: bool) -> torch.Tensor:
    """The rotation (forward) or its transpose (backward) of halves [..., 2, d/2], rounded into out (which
    may be halves itself: both products are taken before it is written).
        forward:  out[0] = x[0] cos - x[1] sin,  out[1] = x[1] cos + x[0] sin
        backward: out[0] = g[0] cos + g[1] sin,  out[1] = g[1] cos - g[0] sin"""
    products_cos, products_sin = halves * cos, halves * sin
    first, second = (torch.sub, torch.add) if forward else (torch.add, torch.sub)
    first(products_cos[..., 0, :], products_sin[..., 1, :], out=out[..., 0, :])
    second(products_cos[..., 1, :], products_sin[..., 0, :], out=out[..., 1, :])
    return out


def _halves(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., 2, d/2] as a view (the head dimension is innermost in every layout used here)."""
    return (x if x.stride(-1) == 1 else x.contiguous()).unflatten(-1, (2, -1))


class _HalfRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        halves = _halves(x)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        ctx.save_for_backward(cos, sin)
        return _rotate_into(halves, cos, sin, torch.empty(halves.shape, dtype=x.dtype, device=x.device),
                            forward=True).flatten(-2)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        halves = _halves(grad)
        out = torch.empty(halves.shape, dtype=grad.dtype, device=grad.device)
        return _rotate_into(halves, cos, sin, out, forward=False).flatten(-2), None, None


def half_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] by angles whose cos/sin ([..., d/2], no gradient) repeat over both halves;
    products in the promoted dtype of (x, cos), the result in x's dtype."""
    return _HalfRotary.apply(x, cos, sin)


class _RotaryQKV(torch.autograd.Function):
    """q and k rotated, v passed through, from one [..., 3, d] projection; the backward writes all three
    gradients into one buffer: a stack and the four rotation kernels. (Rotating a slice of the projection
    and selecting v instead costs, backward, a stack, the rotation, two zero-filled full-size gradient
    buffers with a copy each, and their sum.)"""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        ctx.save_for_backward(cos, sin)
        halves = _halves(qkv[..., :2, :])
        qk = _rotate_into(halves, cos, sin, torch.empty(halves.shape, dtype=qkv.dtype, device=qkv.device),
                          forward=True).flatten(-2)
        q, k = qk.unbind(-2)
        return q, k, qkv.select(-2, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grads = [grad_q, grad_k, grad_v]
        like = next(g for g in grads if g is not None)
        grad = torch.stack([torch.zeros_like(like) if g is None else g for g in grads], dim=-2)
        qk = grad[..., :2, :].unflatten(-1, (2, -1))
        _rotate_into(qk, cos, sin, qk, forward=False)  # in place
        return grad, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The vision tower's rotary on a [..., 3, d] QKV projection -> q, k (rotated), v, each [..., d]: HF's
    fp32 arithmetic bit for bit; cos/sin fp32, one half, broadcastable to the [..., 2, d/2] of q and k.
    Under torch.compile HF's chain is traced instead (inductor fuses it)."""
    if torch.compiler.is_compiling():
        q, k = rotary_reference(qkv[..., :2, :], cos, sin).unbind(-2)
        return q, k, qkv.select(-2, 2)
    return _RotaryQKV.apply(qkv, cos, sin)
