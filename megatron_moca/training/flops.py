"""Model FLOPs of a training step (forward + backward), for TFLOP/s and MFU - pure arithmetic on the config.

Counts the matrix multiplications, as MFU conventionally does (elementwise work is not counted):
  - every linear: 2 x in x out per token forward; backward twice that (input and weight gradients),
    except the patch embedding, whose input (the pixels) needs no gradient;
  - attention: QK^T and AV, 4 x L^2 x (heads x head_dim) forward per segment of L tokens that attend to
    one another (a packed document, an 8x8-patch window, a whole image), half of it when causal; twice
    that backward;
  - the output layer only where logits are made (every position for next-token CE, the masked ones for
    MoCa's MLM), the MAE decoder (one more LLM layer over every token + its linear where predicted).
Model FLOPs use the true widths: the ViT MLP's zero padding (VisionConfig.intermediate_pad_multiple) is
work done but not model work. tests/cpu/test_flops.py checks the formula against torch's FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch

from megatron_moca.config.model import LanguageConfig, ModelConfig, VisionConfig
from megatron_moca.models.vision_layout import vision_layout
from megatron_moca.objectives.masking import IGNORE_INDEX


@dataclass
class StepShape:
    """What a step computes on, for the FLOP count."""

    documents: List[int] = field(default_factory=list)
    """Token count of every attention segment in the LLM batch (one per row, or per packed document)."""
    logit_tokens: int = 0
    """Positions put through the output layer."""
    image_grids: List[Tuple[int, int, int]] = field(default_factory=list)
    """image_grid_thw of every image the vision tower encodes."""
    mae_tokens: int = -1
    """Positions the MAE decoder predicts (-1: no MAE decoder in the step)."""
    causal: bool = False


def _llm_layer_forward(cfg: LanguageConfig, documents: Sequence[int], causal: bool) -> float:
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_query_groups * cfg.head_dim
    h = cfg.hidden_size
    per_token = 2 * (h * (q + 2 * kv) + q * h + 3 * h * cfg.ffn_hidden_size)
    attention = sum(4 * n * n * q for n in documents) * (0.5 if causal else 1.0)
    return per_token * sum(documents) + attention


def vision_forward(cfg: VisionConfig, image_grids: Sequence[Tuple[int, int, int]], llm_hidden: int) -> Tuple[float, float]:
    """(forward FLOPs of the tower without the patch embedding, forward FLOPs of the patch embedding)."""
    if not image_grids:
        return 0.0, 0.0
    layout = vision_layout(torch.tensor(image_grids), cfg)
    patches = sum(t * h * w for t, h, w in image_grids)
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_patch_block = 2 * (4 * d * d + 3 * d * f)
    def attention(segments):
        return sum(4 * n * n * d * count for n, count in segments.groups)

    full = sum(0 <= i < cfg.depth for i in set(cfg.fullatt_block_indexes))
    blocks = (cfg.depth * per_patch_block * patches + full * attention(layout.image_segments)
              + (cfg.depth - full) * attention(layout.window_segments))
    merged = patches // cfg.merge_unit
    width = d * cfg.merge_unit
    merger = 2 * (width * width + width * llm_hidden) * merged
    return blocks + merger, 2.0 * cfg.patch_dim * d * patches


def training_step_flops(cfg: ModelConfig, shape: StepShape) -> float:
    """Model FLOPs of one forward + backward over `shape`."""
    lang = cfg.language
    forward = lang.num_layers * _llm_layer_forward(lang, shape.documents, shape.causal)
    forward += 2 * lang.hidden_size * lang.vocab_size * shape.logit_tokens
    if shape.mae_tokens >= 0:
        forward += _llm_layer_forward(lang, shape.documents, shape.causal)
        forward += 2 * lang.hidden_size * cfg.vision.merge_unit * cfg.vision.patch_dim * shape.mae_tokens
    tower, patch_embed = vision_forward(cfg.vision, shape.image_grids, lang.hidden_size)
    return 3 * (forward + tower) + 2 * patch_embed


def step_shape_of(batch, causal: bool = False, mae_decoder: bool = True) -> StepShape:
    """The StepShape of a stage-1 micro-batch (PackedBatch.model_inputs): attention segments from
    document_ids (padding, id < 0, is no model work), MLM logits at the labelled positions, the images'
    grids, MAE predictions at the noised image tokens."""
    documents = []
    for row in batch["document_ids"]:
        ids = row[row >= 0]
        documents += torch.unique_consecutive(ids, return_counts=True)[1].tolist()
    grid = batch.get("image_grid_thw")
    return StepShape(documents=documents, logit_tokens=int((batch["labels"] != IGNORE_INDEX).sum()),
                     image_grids=[tuple(g) for g in grid.tolist()] if grid is not None else [],
                     mae_tokens=int(batch["mae_token_mask"].sum()) if mae_decoder else -1, causal=causal)
