"""MoCa's stage-1 joint reconstruction loss: text MLM + image MAE, in one forward pass.

    L = L_mlm + mae_weight * L_mae

- MLM: the final hidden state AT each masked position (no shift) through the model's output layer,
  CE against the original token; logits are made for the masked positions only.
- MAE: the MAE decoder's prediction at each noised image token (one 2x2 merge group, 4 x 1176
  values) against the clean processor-normalised pixels; plain MSE over every masked value.

Both parts are returned as sums with their counts as well, so a trainer can normalise over all
micro-batches and data-parallel ranks (per-token loss) instead of averaging micro-batch means.
Runs on the last pipeline stage (megatron's schedules call it as the forward step's loss function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_moca.objectives.losses import token_cross_entropy
from megatron_moca.objectives.masking import IGNORE_INDEX


@dataclass
class ReconstructionConfig:
    """Weights of the stage-1 objective."""

    mae_weight: float = 0.5
    """lambda of L_mlm + lambda * L_mae: the paper's optimum (its sweep: 0.2 -> 66.7, 0.4 -> 67.1,
    0.5 -> 67.5, 0.8 -> 67.2, 1.0 -> 66.9 MMEB); the reference training script ships 0.1."""


def mlm_loss_sum(model, hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(sum of CE over masked tokens, their number); hidden [s, b, h] (final), labels [b, s]."""
    masked = labels != IGNORE_INDEX
    logits = model.logits(hidden.transpose(0, 1)[masked])  # [n, vocab / tp]
    return token_cross_entropy(logits, labels[masked]).sum(), int(masked.sum())


def mae_loss_sum(predictions: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(sum of squared errors, number of values); predictions [n, 4704] at the noised image tokens in
    row-major order, targets [n, 4704] the clean pixels of those merge groups in the same order."""
    if predictions.shape != targets.shape:
        raise ValueError(f"MAE predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
                         "differ: the batch's mae_token_mask and mae_targets do not belong together")
    return (predictions.float() - targets.float()).pow(2).sum(), targets.numel()


def reconstruction_loss(model, hidden: torch.Tensor, batch: Dict[str, torch.Tensor],
                        cfg: ReconstructionConfig = ReconstructionConfig(), mlm_tokens: Optional[int] = None,
                        mae_values: Optional[int] = None) -> Tuple[torch.Tensor, Dict]:
    """The joint loss of one micro-batch and its parts.

    batch: PackedBatch.model_inputs (input_ids, position_ids, document_ids, labels, mae_token_mask,
    pixel_values, image_grid_thw, mae_targets). Each part is its sum divided by this micro-batch's count
    (masked tokens, masked values), or by mlm_tokens / mae_values where given: the counts of the whole
    global batch, which makes the sum over micro-batches and ranks the per-token loss of the step.
    Parts: mlm_loss, mae_loss (detached, as normalised here), and the sums and counts behind them
    (mlm_sum, mlm_count, mae_sum, mae_count)."""
    mlm_sum, mlm_count = mlm_loss_sum(model, hidden, batch["labels"])
    loss = mlm_sum / max(mlm_tokens if mlm_tokens is not None else mlm_count, 1)
    parts = {"mlm_sum": mlm_sum.detach(), "mlm_count": mlm_count, "mlm_loss": loss.detach()}
    select = batch["mae_token_mask"]
    if batch.get("mae_targets") is not None and bool(select.any()):
        predictions = model.mae_predictions(hidden, select, batch["input_ids"], batch.get("position_ids"),
                                            batch.get("document_ids"), batch.get("image_grid_thw"))
        mae_sum, mae_count = mae_loss_sum(predictions, batch["mae_targets"])
        mae = mae_sum / (mae_values if mae_values is not None else mae_count)
        loss = loss + cfg.mae_weight * mae
    else:  # no noised image token in this micro-batch: no image term
        mae_sum, mae_count = hidden.new_zeros((), dtype=torch.float32), 0
        mae = mae_sum
        if model.vision_on_text_batches and model.mae_decoder is not None:
            # every parameter gets a (zero) gradient on every step, as the vision tower does then
            loss = loss + 0.0 * sum(p.sum() for p in model.mae_decoder.parameters())
    parts.update(mae_sum=mae_sum.detach(), mae_count=mae_count, mae_loss=mae.detach())
    return loss, parts
