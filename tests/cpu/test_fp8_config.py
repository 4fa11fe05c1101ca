"""model.fp8: the setting reaches megatron's TransformerConfig of the LLM only; without TE it is refused."""

import pytest


def test_fp8_without_transformer_engine_is_a_clear_error(megatron_runtime):
    """FP8 reaches megatron's TransformerConfig; a machine without TE refuses it with a message."""
    from megatron_moca.config.model import preset
    from megatron_moca.errors import UserError
    from megatron_moca.models.transformer_configs import language_transformer_config, vision_transformer_config
    from megatron_moca.models.vlm import MocaVLM

    cfg = preset("tiny")
    cfg.fp8 = "hybrid"
    llm = language_transformer_config(cfg)
    assert (llm.fp8, llm.fp8_recipe) == ("hybrid", "delayed")
    assert vision_transformer_config(cfg).fp8 is None  # the tower stays in params_dtype
    with pytest.raises(UserError, match="needs Transformer Engine"):
        MocaVLM(cfg)
