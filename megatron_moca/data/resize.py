"""Pillow's bicubic resize of 8-bit images, bit for bit, in torch (so it can run on the GPU).

HF's Qwen2-VL processor resizes with `PIL.Image.resize(..., BICUBIC)`. Pillow's 8-bit path is integer
arithmetic on weights computed in double precision (src/libImaging/Resample.c: `precompute_coeffs`,
`normalize_coeffs_8bpc`, the 8bpc horizontal/vertical passes and `clip8`). This module computes the
same weights with the same double operations in the same order (numpy float64, one operation per
step) and applies them with exact int32 sums, pass by pass with a uint8 image in between, so the
result equals Pillow's on any device. The pass order follows the installed Pillow: before 13.0 the
horizontal pass always ran first (over the rows the vertical pass reads); from 13.0 the vertical
pass runs first when the height shrinks by more than twice as many pixels as the width.
Tested against the installed Pillow on real and random images (tests/data/test_resize.py).
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np
import torch

_PRECISION_BITS = 32 - 8 - 2
_SUPPORT = 2.0  # bicubic
_A = -0.5


def _pillow_at_least_13() -> bool:
    import PIL

    return int(PIL.__version__.split(".")[0]) >= 13


_VERTICAL_FIRST_RULE = _pillow_at_least_13()


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's bicubic filter along one axis: (first source index [out], taps used [out],
    int32 fixed-point weights [out, ksize]). Cached (a resize needs the vertical ones twice, and sizes
    recur across images): callers must not modify the arrays."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inv_filterscale = 1.0 / filterscale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for x in range(ksize):  # summed sequentially, in Pillow's order
        w = np.where(x < count, _bicubic((x + xmin - center + 0.5) * inv_filterscale), 0.0)
        weights[:, x] = w
        total = total + w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, -0.5 + scaled, 0.5 + scaled))
    return xmin, count, fixed.astype(np.int32)


def _pass(source: torch.Tensor, in_size: int, out_size: int, offset: int = 0) -> torch.Tensor:
    """One Pillow pass along axis 0: uint8 [n, ...] whose row 0 is source index `offset`
    -> uint8 [out_size, ...]."""
    xmin, _, weights = coefficients(in_size, out_size)
    dev, ksize = source.device, weights.shape[1]
    index = np.clip(xmin[:, None] - offset + np.arange(ksize)[None, :], 0, source.shape[0] - 1)
    index, w = torch.from_numpy(index).to(dev), torch.from_numpy(weights).to(dev)
    wide = source.to(torch.int32)
    shape = (out_size,) + (1,) * (source.dim() - 1)
    acc = torch.full((out_size, *source.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=dev)
    for k in range(ksize):  # integer sums: exact in any order; taps past a row's count weigh 0
        acc += wide[index[:, k]] * w[:, k].view(shape)
    return (acc >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)  # Pillow's clip8


def resize_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [H, W, C] -> uint8 [height, width, C], equal to the installed Pillow's
    Image.resize((width, height), BICUBIC) of the same image."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"expected a uint8 [H, W, C] image, got {tuple(image.shape)} {image.dtype}")
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (height, width):
        return image.clone()
    shrink_h, shrink_w = in_h - height, in_w - width
    if _VERTICAL_FIRST_RULE and shrink_h > 0 and shrink_h > shrink_w * 2:
        out = _pass(image, in_h, height)
        if width != in_w:
            out = _pass(out.transpose(0, 1), in_w, width).transpose(0, 1)
        return out.contiguous()
    out, first = image, 0
    if width != in_w:
        if height != in_h:  # the horizontal pass covers only the rows the vertical pass reads
            ymin, ycount, _ = coefficients(in_h, height)
            first, last = int(ymin[0]), int(ymin[-1] + ycount[-1])
            out = out[first:last]
        out = _pass(out.transpose(0, 1), in_w, width).transpose(0, 1)
    if height != in_h:
        out = _pass(out, in_h, height, offset=first)
    return out.contiguous()
