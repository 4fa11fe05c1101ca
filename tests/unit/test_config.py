import dataclasses

import pytest

from megatron_moca.config.model import ModelConfig, preset
from megatron_moca.conversion.hf_config import hf_config_from_model, model_config_from_hf
from megatron_moca.errors import UserError


@pytest.mark.parametrize("name", ["tiny", "qwen25vl_3b", "qwen25vl_7b"])
def test_presets_validate_and_round_trip_through_hf_config(name):
    cfg = preset(name)
    cfg.validate()
    back = model_config_from_hf(hf_config_from_model(cfg))
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_exact_qwen25vl_shapes():
    b3, b7 = preset("qwen25vl_3b"), preset("qwen25vl_7b")
    assert (b3.language.hidden_size, b3.language.num_layers, b3.language.num_attention_heads,
            b3.language.num_query_groups, b3.language.ffn_hidden_size, b3.language.vocab_size,
            b3.language.tie_word_embeddings) == (2048, 36, 16, 2, 11008, 151936, True)
    assert (b7.language.hidden_size, b7.language.num_layers, b7.language.num_attention_heads,
            b7.language.num_query_groups, b7.language.ffn_hidden_size, b7.language.vocab_size,
            b7.language.tie_word_embeddings) == (3584, 28, 28, 4, 18944, 152064, False)
    v = b3.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.patch_dim, v.window_merged,
            v.fullatt_block_indexes) == (32, 1280, 16, 3420, 1176, 4, [7, 15, 23, 31])
    assert b3.language.mrope_section == [16, 24, 24] and b3.tokens.mask_token_id == 151665


def test_reads_transformers5_nested_layout():
    from transformers import Qwen2_5_VLConfig

    cfg = preset("tiny")
    cfg.language.tie_word_embeddings = False
    nested = Qwen2_5_VLConfig(**hf_config_from_model(cfg)).to_dict()
    assert "text_config" in nested
    assert model_config_from_hf(nested) == cfg


@pytest.mark.parametrize("tp,pp,fragment", [(4, 1, "must divide the 2 KV heads"), (1, 3, "must divide model.language.num_layers"),
                                            (3, 1, "must divide the 2 KV heads")])
def test_parallel_layout_errors_name_the_problem(tp, pp, fragment):
    with pytest.raises(UserError, match=fragment):
        preset("tiny").validate(tp, pp)


def test_bad_values_are_rejected():
    cfg = preset("tiny")
    cfg.attention = "sideways"
    with pytest.raises(UserError, match="model.attention"):
        cfg.validate()
    cfg = preset("tiny")
    cfg.language.mrope_section = [1, 1, 1]
    with pytest.raises(UserError, match="mrope_section"):
        cfg.validate()
    with pytest.raises(UserError, match="model.language.hidden"):
        ModelConfig.from_dict({"language": {"hidden": 3}})


def test_non_qwen_config_is_refused():
    with pytest.raises(UserError, match="not Qwen2.5-VL"):
        model_config_from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(UserError, match="missing field"):
        model_config_from_hf({"model_type": "qwen2_5_vl", "vision_config": {"depth": 1}})


def test_vision_mlp_padding_lets_tp8_shard_the_tower():
    """Qwen2.5-VL-32B/72B have 8 KV heads: TP=8 needs the ViT's 3420-wide MLP padded (3456 / 8 = 432)."""
    cfg = preset("qwen25vl_7b")
    lang = cfg.language  # Qwen2.5-VL-72B's language model
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = 80, 8192, 64, 8
    lang.ffn_hidden_size = 29568
    cfg.validate(8, 1)
    cfg.vision.intermediate_pad_multiple = 1
    with pytest.raises(UserError, match="tensor_model_parallel_size=8 must divide model.vision.intermediate_size"):
        cfg.validate(8, 1)
    cfg.vision.intermediate_pad_multiple = 0
    with pytest.raises(UserError, match="intermediate_pad_multiple=0: must be >= 1"):
        cfg.validate(1, 1)


def test_fp8_settings_are_validated():
    cfg = preset("tiny")
    cfg.fp8 = "hybrid"
    cfg.validate()  # auto may resolve to te on a GPU machine
    for field, value, message in [("fp8", "e5m2", "model.fp8='e5m2'"), ("fp8_recipe", "linear", "model.fp8_recipe"),
                                  ("attention_backend", "sdpa", "attention_backend must be 'te' or 'auto'")]:
        bad = preset("tiny")
        bad.fp8 = "hybrid"
        setattr(bad, field, value)
        with pytest.raises(UserError, match=message):
            bad.validate()


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_float_settings_refuse_inf_and_nan(where, tmp_path):
    """Any float field (optim.lr, objective.temperature, ...) refuses inf/nan when the config is built."""
    from megatron_moca.config.finetune import load_finetune_config
    from megatron_moca.config.pretrain import load_pretrain_config

    for load, key, value in [(load_pretrain_config, "optim.lr", "nan"), (load_pretrain_config, "optim.clip_grad", "inf"),
                             (load_finetune_config, "objective.temperature", "-inf")]:
        section, name = key.split(".")
        if where == "override":
            args = (None, [f"{key}={value}"])
        else:
            path = tmp_path / "recipe.yaml"
            path.write_text(f"{section}:\n  {name}: {value.replace('inf', '.inf').replace('nan', '.nan')}\n")
            args = (str(path), [])
        with pytest.raises(UserError, match=f"config key {key}: expected a finite number"):
            load(*args)
    assert load_pretrain_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4
