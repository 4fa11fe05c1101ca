"""The HF <-> Megatron mapping table: coverage, exact layouts, exact inverses."""

import pytest
import torch

from megatron_moca.config.model import preset
from megatron_moca.conversion.mapping import Rule, build_rules, normalize_hf_key, to_hf, to_mcore
from megatron_moca.conversion.random_hf import hf_shapes


@pytest.mark.parametrize("name", ["tiny", "qwen25vl_3b", "qwen25vl_7b"])
def test_rules_cover_every_hf_tensor_once(name):
    cfg = preset(name)
    hf_keys = [k for r in build_rules(cfg) for k in r.hf]
    assert len(hf_keys) == len(set(hf_keys))
    assert set(hf_keys) == set(hf_shapes(cfg))
    assert ("lm_head.weight" in hf_keys) == (not cfg.language.tie_word_embeddings)


def test_llm_qkv_is_interleaved_per_kv_group():
    cfg = preset("tiny")  # 4 heads, 2 groups, head_dim 16
    d = cfg.language.head_dim
    q = torch.arange(4 * d).float()[:, None]
    k = 1000 + torch.arange(2 * d).float()[:, None]
    v = 2000 + torch.arange(2 * d).float()[:, None]
    fused = to_mcore(Rule("x", ("q", "k", "v"), "llm_qkv"), [q, k, v], cfg)
    expected = torch.cat([q[:2 * d], k[:d], v[:d], q[2 * d:], k[d:], v[d:]])
    assert torch.equal(fused, expected)


def test_vit_qkv_is_reordered_per_head():
    cfg = preset("tiny")  # 4 heads of 16
    d, heads = cfg.vision.head_dim, cfg.vision.num_heads
    w = torch.arange(3 * heads * d).float()  # [q_all; k_all; v_all] as a bias
    fused = to_mcore(Rule("x", ("qkv",), "vit_qkv"), [w], cfg)
    head1 = fused[3 * d:6 * d]
    assert torch.equal(head1, torch.cat([w[d:2 * d], w[heads * d + d:heads * d + 2 * d],
                                         w[2 * heads * d + d:2 * heads * d + 2 * d]]))


def test_patch_embedding_is_the_conv3d():
    cfg = preset("tiny")
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)
    w = to_mcore(Rule("x", ("w",), "patch"), [conv.weight.detach()], cfg)
    rows = torch.randn(5, 1176)
    expected = conv(rows.view(-1, 3, 2, 14, 14)).view(5, 8)
    assert torch.allclose(rows @ w.T, expected, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_every_rule_round_trips_exactly(tie):
    cfg = preset("tiny")
    cfg.language.tie_word_embeddings = tie
    shapes = hf_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    for rule in build_rules(cfg):
        tensors = [torch.randn(shapes[k], generator=g) for k in rule.hf]
        back = to_hf(rule, to_mcore(rule, tensors, cfg), cfg)
        assert list(back) == list(rule.hf)
        for name, t in zip(rule.hf, tensors):
            assert torch.equal(back[name], t), name


def test_mask_token_row_survives_mapping():
    cfg = preset("tiny")
    rule = next(r for r in build_rules(cfg) if r.mcore.endswith("word_embeddings.weight"))
    emb = torch.randn(cfg.language.vocab_size, cfg.language.hidden_size)
    out = to_mcore(rule, [emb], cfg)
    assert cfg.tokens.mask_token_id < cfg.language.vocab_size
    assert torch.equal(out[cfg.tokens.mask_token_id], emb[cfg.tokens.mask_token_id])


def test_new_transformers_names_are_normalised():
    assert normalize_hf_key("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert normalize_hf_key("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert normalize_hf_key("lm_head.weight") == "lm_head.weight"


def test_vit_mlp_is_zero_padded_to_the_model_width():
    cfg = preset("qwen25vl_3b")
    assert (cfg.vision.intermediate_size, cfg.vision.padded_intermediate_size) == (3420, 3456)
    cfg = preset("tiny")  # 96 -> 128
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    fc1 = to_mcore(Rule("x", ("g", "u"), "vit_gated"), [gate, up], cfg)
    assert torch.equal(fc1, torch.cat([gate, torch.zeros(32, 64), up, torch.zeros(32, 64)]))
    down = torch.randn(64, 96)
    fc2 = to_mcore(Rule("x", ("d",), "vit_fc2"), [down], cfg)
    assert torch.equal(fc2, torch.cat([down, torch.zeros(64, 32)], dim=1))
    cfg.vision.intermediate_pad_multiple = 1  # padding off: the plain gated layout
    assert torch.equal(to_mcore(Rule("x", ("g", "u"), "vit_gated"), [gate, up], cfg), torch.cat([gate, up]))


def test_non_zero_padding_is_not_silently_dropped():
    from megatron_moca.errors import UserError

    cfg = preset("tiny")
    fc2 = torch.zeros(64, 128)
    fc2[5, 120] = 1.0
    with pytest.raises(UserError, match="padded vision MLP channels 96..127 hold non-zero values"):
        to_hf(Rule("vision.blocks.0.mlp.linear_fc2.weight", ("d",), "vit_fc2"), fc2, cfg)
