"""Qwen2.5-VL config.json <-> ModelConfig (pure; no transformers import).

Reads both layouts: the released (transformers 4.x) one with text fields at the top level and
`rope_scaling`, and the transformers 5.x one with a nested `text_config` and `rope_parameters`.
Writes the legacy layout, which every transformers version from 4.49 on loads.
"""

from __future__ import annotations

from megatron_moca.config.model import LanguageConfig, ModelConfig, TokenIds, VisionConfig
from megatron_moca.errors import UserError

QWEN25VL_MODEL_TYPE = "qwen2_5_vl"


def model_config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face Qwen2.5-VL config dict; raise UserError for anything else."""
    model_type = cfg.get("model_type")
    if model_type != QWEN25VL_MODEL_TYPE:
        raise UserError(f"{source}: model_type={model_type!r} is not Qwen2.5-VL ({QWEN25VL_MODEL_TYPE!r})")
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    vis = cfg.get("vision_config")
    if not isinstance(vis, dict):
        raise UserError(f"{source}: no vision_config section")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    try:
        language = LanguageConfig(
            num_layers=int(text["num_hidden_layers"]), hidden_size=int(text["hidden_size"]),
            num_attention_heads=int(text["num_attention_heads"]),
            num_query_groups=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            ffn_hidden_size=int(text["intermediate_size"]), vocab_size=int(text["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1000000.0))),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            max_position_embeddings=int(text.get("max_position_embeddings", 128000)))
        vision = VisionConfig(
            depth=int(vis["depth"]), hidden_size=int(vis["hidden_size"]), num_heads=int(vis["num_heads"]),
            intermediate_size=int(vis["intermediate_size"]), patch_size=int(vis.get("patch_size", 14)),
            temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
            in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
            spatial_merge_size=int(vis.get("spatial_merge_size", 2)), window_size=int(vis.get("window_size", 112)),
            fullatt_block_indexes=list(vis.get("fullatt_block_indexes", [7, 15, 23, 31])))
    except KeyError as e:
        raise UserError(f"{source}: missing field {e.args[0]!r} for a Qwen2.5-VL config") from None
    out_hidden = vis.get("out_hidden_size", language.hidden_size)
    if out_hidden != language.hidden_size:
        raise UserError(f"{source}: vision_config.out_hidden_size={out_hidden} != hidden_size={language.hidden_size}")
    if vis.get("hidden_act", "silu") != "silu" or text.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: only SiLU (SwiGLU) activations are supported, as in Qwen2.5-VL")
    tokens = TokenIds(image_token_id=int(cfg.get("image_token_id", 151655)),
                      video_token_id=int(cfg.get("video_token_id", 151656)),
                      vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
                      vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)))
    return ModelConfig(vision=vision, language=language, tokens=tokens)


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """The legacy-layout config.json of a Qwen2.5-VL checkpoint with these shapes."""
    lang, vis, tok = cfg.language, cfg.vision, cfg.tokens
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": QWEN25VL_MODEL_TYPE,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": lang.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": lang.ffn_hidden_size,
        "max_position_embeddings": lang.max_position_embeddings,
        "max_window_layers": lang.num_layers,
        "num_attention_heads": lang.num_attention_heads,
        "num_hidden_layers": lang.num_layers,
        "num_key_value_heads": lang.num_query_groups,
        "rms_norm_eps": lang.norm_eps,
        "rope_theta": lang.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(lang.mrope_section)},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": lang.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": lang.vocab_size,
        "image_token_id": tok.image_token_id,
        "video_token_id": tok.video_token_id,
        "vision_start_token_id": tok.vision_start_token_id,
        "vision_end_token_id": tok.vision_end_token_id,
        "vision_token_id": 151654,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": vis.depth,
            "hidden_act": "silu",
            "hidden_size": vis.hidden_size,
            "intermediate_size": vis.intermediate_size,
            "num_heads": vis.num_heads,
            "in_chans": vis.in_channels,
            "out_hidden_size": lang.hidden_size,
            "patch_size": vis.patch_size,
            "spatial_merge_size": vis.spatial_merge_size,
            "spatial_patch_size": vis.patch_size,
            "temporal_patch_size": vis.temporal_patch_size,
            "window_size": vis.window_size,
            "fullatt_block_indexes": list(vis.fullatt_block_indexes),
            "tokens_per_second": 2,
        },
    }


TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
             "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers",
             "attention_dropout", "initializer_range", "use_cache", "bos_token_id", "eos_token_id",
             "tie_word_embeddings", "torch_dtype", "dtype")
"""The language model's fields of a legacy-layout config, copied into its text_config."""


def declare_bidirectional(config: dict) -> dict:
    """`config` (a Qwen2.5-VL config.json dict, either layout) stating bidirectional attention where transformers,
    vLLM and sentence-transformers read it: `is_causal: false` at the top level and in a complete `text_config`
    (transformers 5 builds the language model from text_config - a partial one would fall back to its defaults
    - and turns a causal mask into a bidirectional one where that config says is_causal false; vLLM's pooling
    runner reads text_config too). The legacy top-level fields stay for readers of the old layout. Returns it."""
    text = dict(config.get("text_config") or {})
    for key in TEXT_KEYS:
        if key in config and key not in text:
            text[key] = config[key]
    text.setdefault("model_type", "qwen2_5_vl_text")
    text["is_causal"] = False
    config["text_config"] = text
    config["is_causal"] = False
    return config
