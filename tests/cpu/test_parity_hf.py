"""MocaVLM (megatron-core) computes what transformers' Qwen2_5_VLForConditionalGeneration computes.

fp32, tiny random configs; causal mode against HF's own causal model, bidirectional mode against HF
given a padding-only 4-D mask. Bound: max abs logits difference <= 1e-4 on every real token.
"""

import pytest
import torch
from helpers import build_batch, hf_model, ours_from_hf

from megatron_moca.config.model import LanguageConfig, VisionConfig, preset
from megatron_moca.conversion.verification import hf_logits, ours_logits


def config(name):
    cfg = preset("tiny")
    if name == "mha_untied_odd":
        cfg.language = LanguageConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                                      ffn_hidden_size=96, vocab_size=151936, tie_word_embeddings=False,
                                      mrope_section=[2, 3, 3])
        cfg.vision = VisionConfig(depth=3, hidden_size=48, num_heads=3, intermediate_size=80,
                                  fullatt_block_indexes=[0])
    elif name == "mqa_no_full_blocks":
        cfg.language = LanguageConfig(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=1,
                                      ffn_hidden_size=128, vocab_size=151936, mrope_section=[1, 1, 2])
        cfg.vision = VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                  fullatt_block_indexes=[])
    return cfg


BATCHES = {
    "several_images_and_text_row": [[(1, 6, 10), (1, 4, 4)], [(1, 20, 18)], []],
    "odd_windows": [[(1, 14, 22)], [(1, 2, 2), (1, 34, 2)]],
    "text_only": [[], []],
}


@pytest.mark.parametrize("name", ["tiny", "mha_untied_odd", "mqa_no_full_blocks"])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_logits_match_transformers(megatron_runtime, name, batch, mode):
    cfg = config(name)
    cfg.attention = mode
    hf = hf_model(cfg, seed=len(name))
    ours = ours_from_hf(cfg, hf)
    ids, mask, pixels, grid = build_batch(cfg, BATCHES[batch], seed=7)
    ref = hf_logits(hf, ids, mask, pixels, grid, cfg.tokens.image_token_id, bidirectional=mode == "bidirectional")
    got = ours_logits(ours, ids, mask, pixels, grid)
    valid = mask.bool()
    diff = (ref[valid] - got[valid]).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref[valid].abs().max().item() > 0.1  # a real comparison, not of two zero tensors


@pytest.mark.parametrize("backend", ["local", "flex"])
def test_other_cpu_backends_match_transformers(megatron_runtime, backend):
    cfg = config("tiny")
    cfg.attention_backend = backend
    hf = hf_model(cfg, seed=3)
    ours = ours_from_hf(cfg, hf)
    ids, mask, pixels, grid = build_batch(cfg, BATCHES["several_images_and_text_row"], seed=2)
    for mode in ("bidirectional", "causal"):
        ours.set_attention(mode)
        ref = hf_logits(hf, ids, mask, pixels, grid, cfg.tokens.image_token_id, bidirectional=mode == "bidirectional")
        got = ours_logits(ours, ids, mask, pixels, grid)
        valid = mask.bool()
        assert (ref[valid] - got[valid]).abs().max().item() <= 1e-4, (backend, mode)


def test_vision_tower_matches_transformers(megatron_runtime):
    cfg = config("tiny")
    hf = hf_model(cfg, seed=5)
    ours = ours_from_hf(cfg, hf)
    grid = torch.tensor([[1, 14, 22], [1, 8, 8]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours.vision(pixels, grid)
    assert (ref - got).abs().max().item() <= 1e-5
