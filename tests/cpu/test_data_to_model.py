"""A packed stage-1 batch built from real documents runs through MocaVLM: positions, document ids and
pixels from the data pipeline agree with what the model computes itself."""

import torch
from helpers import packed_real_row, tiny_config

from megatron_moca.models.vlm import MocaVLM


def test_packed_real_documents_through_the_model(megatron_runtime):
    row = packed_real_row(max_length=900, pack_length=2048)
    inputs = row.model_inputs()
    cfg = tiny_config()
    torch.manual_seed(0)
    model = MocaVLM(cfg).eval()
    computed = model.position_ids(inputs["input_ids"], inputs["image_grid_thw"], inputs["document_ids"])
    valid = inputs["document_ids"][0] >= 0
    assert torch.equal(computed[:, 0, valid], inputs["position_ids"][:, 0, valid])
    with torch.no_grad():
        hidden = model(inputs["input_ids"], position_ids=inputs["position_ids"], document_ids=inputs["document_ids"],
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    assert hidden.shape == (row.input_ids.shape[1], 1, cfg.language.hidden_size)
    assert torch.isfinite(hidden).all()
    assert int(inputs["mae_token_mask"].sum()) == inputs["mae_targets"].shape[0] > 0
