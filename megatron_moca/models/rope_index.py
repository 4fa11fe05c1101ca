"""Qwen2.5-VL 3-D M-RoPE position ids as a pure function (transformers' `get_rope_index`).

Text tokens get the same id on all three axes, counting on from the previous token; the tokens of an
image get (t, h, w) grid ids offset by the position where the image starts, and the text after it
continues from start + max(h, w) / merge. Images are consumed in order from `image_grid_thw`; each
takes t*h*w / merge^2 consecutive <|image_pad|> tokens, so two adjacent images are told apart by
their grids, not by markers. With `document_ids`, positions restart at 0 in every packed document
(each document is laid out exactly as if it were alone). Padding positions get 0.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def _image_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _segment_positions(ids: List[int], grids: List[Tuple[int, int, int]], grid_pos: int, image_token_id: int,
                       merge: int) -> Tuple[torch.Tensor, int]:
    """Positions [3, len(ids)] of one document; returns them and the next unused grid index."""
    parts, pos, i, n = [], 0, 0, len(ids)
    while i < n:
        if ids[i] == image_token_id:
            if grid_pos >= len(grids):
                raise ValueError("more <|image_pad|> tokens than image_grid_thw rows describe")
            t, h, w = grids[grid_pos]
            grid_pos += 1
            h, w = h // merge, w // merge
            count = t * h * w
            if ids[i:i + count] != [image_token_id] * count:
                raise ValueError(f"image {grid_pos - 1} needs {count} consecutive <|image_pad|> tokens")
            parts.append(_image_positions(pos, t, h, w))
            pos += max(h, w)
            i += count
        else:
            j = i
            while j < n and ids[j] != image_token_id:
                j += 1
            parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long), grid_pos
    return torch.cat(parts, dim=1), grid_pos


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], *, image_token_id: int = 151655,
                   spatial_merge_size: int = 2, attention_mask: Optional[torch.Tensor] = None,
                   document_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (position_ids [3, b, s], rope_deltas [b, 1]) as transformers' Qwen2.5-VL computes them.

    attention_mask: [b, s], 1/True for real tokens (padding may sit anywhere).
    document_ids: [b, s] packed-document index per token (negative = padding); positions restart per
    document. rope_deltas is max position + 1 - number of real tokens (for generation), per row.
    """
    b, s = input_ids.shape
    grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    valid = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if document_ids is not None:
        valid = valid & (document_ids.cpu() >= 0)
    docs = document_ids.cpu() if document_ids is not None else torch.zeros(b, s, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    deltas = []
    grid_pos = 0
    for row in range(b):
        idx = valid[row].nonzero().flatten()
        row_max, count = -1, 0
        if len(idx):
            row_docs = docs[row, idx]
            # split the valid tokens of the row into runs of equal document id
            cuts = (row_docs[1:] != row_docs[:-1]).nonzero().flatten() + 1
            for seg in torch.tensor_split(idx, cuts.tolist()):
                pos, grid_pos = _segment_positions(ids_cpu[row, seg].tolist(), grids, grid_pos, image_token_id,
                                                   spatial_merge_size)
                position_ids[:, row, seg] = pos
                row_max = max(row_max, int(pos.max()))
                count += len(seg)
        deltas.append(row_max + 1 - count)
    if grid_pos != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the tokens hold {grid_pos} images")
    return position_ids.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
