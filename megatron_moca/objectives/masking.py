"""MoCa stage-1 masking, pure numpy (runs in data-loader workers).

Text MLM: every non-special text token is replaced by <|mask|> with probability p (0.4; 100%
replacement, no 80/10/10); the label at the SAME position is the original id (no shift), -100
elsewhere. Special tokens (vision markers, image pads, chat tokens) are never masked.
Image MAE: the unit is one 2x2 merge group (4 pixel rows = one LLM image token), masked with
probability p (0.5); all rows of every masked group in a sample are overwritten by ONE shared
Gaussian noise vector of 1176 values; nothing is dropped. Targets are the clean normalised pixels.
The group mask and the noise vector are drawn here; the noise is applied where the pixels are
normalised, on the device (data/pixels.py), so loader workers never touch float pixels.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np

IGNORE_INDEX = -100


def mlm_mask(ids: np.ndarray, special_ids: Iterable[int], mask_id: int, probability: float,
             rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels): labels hold the original id where masked, IGNORE_INDEX elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    maskable = ~np.isin(ids, np.fromiter(special_ids, dtype=np.int64))
    chosen = maskable & (rng.random(ids.shape) < probability)
    labels = np.where(chosen, ids, IGNORE_INDEX)
    return np.where(chosen, mask_id, ids), labels


def mae_group_mask(num_groups: int, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Bool per merge group (= per image token), True = masked."""
    return rng.random(num_groups) < probability
