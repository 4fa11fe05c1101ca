"""The ViT SwiGLU width is zero-padded inside the model (VisionConfig.intermediate_pad_multiple):
padded channels start at zero, get exactly zero gradients, and conversion adds and strips them."""

from types import SimpleNamespace

import pytest
import torch
from helpers import build_batch, hf_model, hidden_and_grads, ours_from_hf

from megatron_moca.config.model import preset
from megatron_moca.conversion.weights import model_to_hf
from megatron_moca.errors import UserError
from megatron_moca.models.vlm import MocaVLM


def padded_tiny():
    cfg = preset("tiny")
    assert (cfg.vision.intermediate_size, cfg.vision.padded_intermediate_size) == (96, 128)
    return cfg


def padding_of(block, cfg):
    """(fc1 gate and up rows, fc1 bias, fc2 columns) of the padded channels, at TP=1."""
    real, padded = cfg.vision.intermediate_size, cfg.vision.padded_intermediate_size
    fc1, fc2 = block.mlp.linear_fc1, block.mlp.linear_fc2
    return (fc1.weight.view(2, padded, -1)[:, real:], fc1.bias.view(2, padded)[:, real:], fc2.weight[:, real:])


def test_padded_channels_start_at_zero_and_get_zero_gradients(megatron_runtime):
    cfg = padded_tiny()
    torch.manual_seed(0)
    model = MocaVLM(cfg)
    for block in model.vision.blocks:
        assert block.mlp.linear_fc1.weight.shape[0] == 2 * 128
        assert all(bool((t == 0).all()) for t in padding_of(block, cfg))
        assert bool(block.mlp.linear_fc1.weight[:96].ne(0).any())  # the real channels were initialised
    ids, _, pixels, grid = build_batch(cfg, [[(1, 8, 12)]], seed=1)
    _, grads = hidden_and_grads(model, ids, pixels, grid)
    for i, block in enumerate(model.vision.blocks):
        g1 = grads[f"vision.blocks.{i}.mlp.linear_fc1.weight"].view(2, 128, -1)
        assert bool(g1[:, 96:].eq(0).all()) and bool(g1[:, :96].ne(0).any())
        assert bool(grads[f"vision.blocks.{i}.mlp.linear_fc1.bias"].view(2, 128)[:, 96:].eq(0).all())
        g2 = grads[f"vision.blocks.{i}.mlp.linear_fc2.weight"]
        assert bool(g2[:, 96:].eq(0).all()) and bool(g2[:, :96].ne(0).any())


def test_each_tp_rank_zeroes_its_own_share(monkeypatch):
    """TP=2, padded width 128 of which 96 real: rank 0 holds channels 0..63 (no padding), rank 1
    holds 64..127 (local 32..63 padded) in its gate half and its up half."""
    from megatron.core import parallel_state

    from megatron_moca.models.vision import zero_mlp_padding

    vcfg = padded_tiny().vision
    for rank, first_padded in ((0, None), (1, 32)):
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        mlp = SimpleNamespace(config=SimpleNamespace(tensor_model_parallel_size=2),
                              linear_fc1=SimpleNamespace(weight=torch.ones(2 * 64, 8), bias=torch.ones(2 * 64)),
                              linear_fc2=SimpleNamespace(weight=torch.ones(8, 64)))
        zero_mlp_padding(mlp, vcfg)
        expect = torch.ones(64)
        if first_padded is not None:
            expect[first_padded:] = 0
        assert torch.equal(mlp.linear_fc1.weight.view(2, 64, 8)[:, :, 0], torch.stack([expect, expect]))
        assert torch.equal(mlp.linear_fc1.bias, torch.cat([expect, expect]))
        assert torch.equal(mlp.linear_fc2.weight[0], expect)


def test_export_strips_padding_and_refuses_non_zero_padding(megatron_runtime):
    cfg = padded_tiny()
    hf = hf_model(cfg, seed=2)
    ours = ours_from_hf(cfg, hf)
    exported = dict(model_to_hf(ours, cfg))
    reference = hf.state_dict()
    for name in ("visual.blocks.0.mlp.gate_proj.weight", "visual.blocks.0.mlp.up_proj.bias",
                 "visual.blocks.0.mlp.down_proj.weight"):
        assert torch.equal(exported[name], reference[f"model.{name}"]), name
    with torch.no_grad():
        ours.vision.blocks[1].mlp.linear_fc2.weight[3, 100] = 0.5
    with pytest.raises(UserError, match=r"vision\.blocks\.1\.mlp\.linear_fc2\.weight: the padded vision MLP"):
        dict(model_to_hf(ours, cfg))


def test_checkpoint_configs_from_before_the_padding_read_as_unpadded(tmp_path):
    import json

    from megatron_moca.checkpointing import MODEL_JSON, read_model_config

    cfg = padded_tiny().to_dict()
    del cfg["vision"]["intermediate_pad_multiple"]
    (tmp_path / MODEL_JSON).write_text(json.dumps({"model": cfg}))
    assert read_model_config(str(tmp_path)).vision.padded_intermediate_size == 96
    cfg["vision"]["intermediate_pad_multiple"] = 128
    (tmp_path / MODEL_JSON).write_text(json.dumps({"model": cfg}))
    assert read_model_config(str(tmp_path)).vision.padded_intermediate_size == 128


def test_a_vision_mlp_wider_than_the_config_is_a_clear_error(megatron_runtime):
    from megatron_moca.conversion.mapping import normalize_hf_key
    from megatron_moca.conversion.weights import load_hf_into_model

    cfg = padded_tiny()
    state = {normalize_hf_key(k): v for k, v in hf_model(cfg, seed=4).state_dict().items()}
    state["visual.blocks.2.mlp.gate_proj.weight"] = torch.zeros(140, cfg.vision.hidden_size)  # config says 96
    model = MocaVLM(cfg)
    with pytest.raises(UserError, match=r"visual\.blocks\.2\.mlp\.gate_proj\.weight has shape"):
        load_hf_into_model(model, lambda k: state[k], cfg)
