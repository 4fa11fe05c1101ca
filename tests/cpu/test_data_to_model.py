"""A packed stage-1 batch built from real documents runs through MocaVLM: positions, document ids and
pixels from the data pipeline agree with what the model computes itself."""

import numpy as np
import torch
from helpers import tiny_config

from megatron_moca.data.documents import PLACEHOLDER, from_record
from megatron_moca.data.samples import GreedyPacker, Stage1SampleBuilder, Stage1SampleConfig
from megatron_moca.data.tokenizer import QwenTokenizer
from megatron_moca.models.vlm import MocaVLM


def test_packed_real_documents_through_the_model(megatron_runtime):
    import glob
    import os

    import skimage

    images = sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.png")))[:3]
    tok = QwenTokenizer()
    builder = Stage1SampleBuilder(tok, Stage1SampleConfig(max_length=900, image_pipeline="cpu"))
    docs = [from_record({"text": f"Figure {i}: {PLACEHOLDER} shows a test image. " * 1, "images": [images[i]]},
                        f"doc{i}") for i in range(2)] + [from_record({"text": "plain text " * 30}, "doc2")]
    packer = GreedyPacker(length=2048, pad_id=tok.pad_id, pad_to_multiple=16)
    for i, d in enumerate(docs):
        assert packer.add(builder.build(d, np.random.default_rng(i))) is None
    row = packer.flush()
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
