"""`moca convert verify`: does a megatron_moca checkpoint compute what the HF folder computes?

Two checks on CPU: (1) every HF tensor against the checkpoint's tensor mapped back to HF layout
(names each mismatching tensor), (2) logits of the transformers model and of MocaVLM on a fixed
batch with an image, padding and a text-only row: causal mode against HF given a causal 4-D mask, and
bidirectional mode against HF given a padding-only one (explicit masks: an export of a MoCa checkpoint
declares is_causal false, so HF's own mask would be bidirectional in both). The last line printed is
`max_abs_diff=<float>`; the command fails above the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from megatron_moca.checkpointing import load_model, read_model_config, resolve_checkpoint
from megatron_moca.conversion.convert import _unsharded_model
from megatron_moca.conversion.hf_io import SafetensorsReader, load_transformers_model, read_config
from megatron_moca.conversion.weights import model_to_hf


@dataclass
class VerifyResult:
    max_abs_diff: float
    logits_diff: dict
    mismatched_tensors: List[str] = field(default_factory=list)


def fixed_batch(cfg, seed: int = 0):
    """Two rows: text + one 8x12-patch image + text, and a shorter text-only row (right padding)."""
    g = torch.Generator().manual_seed(seed)
    tok = cfg.tokens
    grid = torch.tensor([[1, 8, 12]])
    n_img = int(grid.prod()) // cfg.vision.merge_unit
    vocab_hi = min(cfg.language.vocab_size, 151643)
    text = lambda n: torch.randint(0, vocab_hi, (n,), generator=g).tolist()
    row0 = text(7) + [tok.vision_start_token_id] + [tok.image_token_id] * n_img + [tok.vision_end_token_id] + text(9)
    row1 = text(20)
    s = len(row0)
    ids = torch.full((2, s), tok.pad_token_id)
    mask = torch.zeros(2, s, dtype=torch.long)
    for r, row in enumerate((row0, row1)):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    pixels = torch.randn(int(grid.prod()), cfg.vision.patch_dim, generator=g)
    return ids, mask, pixels, grid


@torch.no_grad()
def hf_logits(hf_model, ids, mask, pixels, grid, image_token_id: int, bidirectional: bool):
    mm_types = (ids == image_token_id).int()  # text (0) / image (1) per token
    pos, _ = hf_model.model.get_rope_index(ids, mm_types, grid, attention_mask=mask)
    b, s = ids.shape
    keys = mask.bool()[:, None, None, :].expand(b, 1, s, s)  # HF 4-D bool: True = attend
    if not bidirectional:  # spelled out: a MoCa export's config declares is_causal false, so HF's own is not causal
        keys = keys & torch.ones(s, s, dtype=torch.bool).tril()
    return hf_model(input_ids=ids, attention_mask=keys, position_ids=pos, pixel_values=pixels,
                    image_grid_thw=grid).logits


@torch.no_grad()
def ours_logits(model, ids, mask, pixels, grid):
    doc = torch.where(mask.bool(), 0, -1)
    hidden = model(ids, document_ids=doc, pixel_values=pixels, image_grid_thw=grid)
    return model.logits(hidden, gather=True).transpose(0, 1)


def verify(hf_dir: str, checkpoint: str, dtype: torch.dtype = torch.float32) -> VerifyResult:
    read_config(hf_dir)
    folder = resolve_checkpoint(checkpoint)
    cfg = read_model_config(folder)
    reader = SafetensorsReader(hf_dir)
    model = _unsharded_model(cfg)
    load_model(model, folder)
    mismatched = []
    for name, ours in model_to_hf(model, cfg):
        if name not in reader:
            mismatched.append(f"{name} (missing in HF folder)")
            continue
        theirs = reader.get(name)
        if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.dtype), ours):
            mismatched.append(name)
    model = model.to(dtype).eval()
    hf_model = load_transformers_model(hf_dir, dtype).eval()
    ids, mask, pixels, grid = fixed_batch(cfg)
    valid = mask.bool()
    diffs = {}
    for mode in ("causal", "bidirectional"):
        model.set_attention(mode)
        ref = hf_logits(hf_model, ids, mask, pixels, grid, cfg.tokens.image_token_id, mode == "bidirectional")
        got = ours_logits(model, ids, mask, pixels, grid)
        diffs[mode] = float((ref[valid].float() - got[valid].float()).abs().max())
    return VerifyResult(max_abs_diff=max(diffs.values()), logits_diff=diffs, mismatched_tensors=mismatched)

