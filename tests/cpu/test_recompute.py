"""model.recompute_granularity: recomputing activations in the backward pass changes memory, not
results - the stage-1 loss and every gradient equal the run that keeps its activations (fp32, CPU)."""

import pytest
import torch
from helpers import packed_real_row, tiny_config

from megatron_moca.models.vlm import MocaVLM
from megatron_moca.objectives.reconstruction import reconstruction_loss


@pytest.fixture(scope="module")
def packed_inputs():
    return packed_real_row(max_length=700, pack_length=1600).model_inputs()


def loss_and_grads(recompute, inputs):
    cfg = tiny_config()
    cfg.recompute_granularity = recompute
    torch.manual_seed(0)
    model = MocaVLM(cfg, mae_decoder=True)
    model.train()
    hidden = model(inputs["input_ids"], position_ids=inputs["position_ids"], document_ids=inputs["document_ids"],
                   pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    loss, _ = reconstruction_loss(model, hidden, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_gives_the_same_loss_and_gradients(megatron_runtime, packed_inputs, recompute):
    ref_loss, ref_grads, _ = loss_and_grads(None, packed_inputs)
    loss, grads, model = loss_and_grads(recompute, packed_inputs)
    assert model.language.decoder.config.recompute_granularity == recompute
    assert model.vision.recompute == (recompute == "full")
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys() and len(grads) > 50
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
