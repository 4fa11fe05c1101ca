"""Typed model configuration: the Qwen2.5-VL shapes plus MoCa's attention switch.

Pure dataclasses (no torch, no megatron) so that validation, presets and HF config translation are
cheap to import and unit-test. Field names follow Megatron where Megatron has a name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_moca.errors import UserError

ATTENTION_MODES = ("bidirectional", "causal")
ATTENTION_BACKENDS = ("auto", "te", "flash", "flex", "sdpa", "local")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
RECOMPUTE = ("selective", "full")


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision tower (ViT + 2x2 patch merger)."""

    depth: int = 32
    """Number of ViT blocks."""
    hidden_size: int = 1280
    """ViT width."""
    num_heads: int = 16
    """Attention heads (MHA: as many K/V heads as query heads)."""
    intermediate_size: int = 3420
    """SwiGLU FFN width (the checkpoint's, as in HF's config)."""
    intermediate_pad_multiple: int = 128
    """Inside the model the SwiGLU width is zero-padded up to a multiple of this (3420 -> 3456): GEMMs over
    3420 columns are not 16-byte aligned in bf16 and fall back to slow kernels, and 3420 does not divide
    by TP=8. The padded channels are zero, get exactly zero gradients (silu(0) * 0) and so stay zero;
    conversion adds and strips them. 1 = no padding."""
    patch_size: int = 14
    """Spatial patch size in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch (a still image is repeated twice)."""
    in_channels: int = 3
    """Colour channels."""
    spatial_merge_size: int = 2
    """Patches merged per side into one LLM token (2 -> 2x2 = 4 patches per token)."""
    window_size: int = 112
    """Window-attention side in pixels (112 px = 8x8 patches = 4x4 merged tokens)."""
    fullatt_block_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])
    """Blocks that attend over the whole image instead of windows."""
    rope_theta: float = 10000.0
    """Base of the 2-D rotary embedding."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (blocks and merger)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_intermediate_size(self) -> int:
        """The SwiGLU width the model's linears have (see intermediate_pad_multiple)."""
        m = self.intermediate_pad_multiple
        return -(-self.intermediate_size // m) * m

    @property
    def patch_dim(self) -> int:
        """Values in one pixel-patch row: channels x frames x patch x patch (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass
class LanguageConfig:
    """The Qwen2.5 language model inside Qwen2.5-VL."""

    num_layers: int = 36
    """Transformer layers."""
    hidden_size: int = 2048
    """Model width."""
    num_attention_heads: int = 16
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int = 11008
    """SwiGLU FFN width."""
    vocab_size: int = 151936
    """Rows of the (padded) embedding table."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer (3B: tied, 7B: untied)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 1000000.0
    """Rotary base."""
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    """M-RoPE split of the rotary half-dimension into (temporal, height, width)."""
    max_position_embeddings: int = 128000
    """Longest position the rotary tables are sized for."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TokenIds:
    """Special token ids of the Qwen2.5-VL vocabulary (and MoCa's <|mask|>)."""

    image_token_id: int = 151655
    """<|image_pad|>: one per merged image patch."""
    video_token_id: int = 151656
    """<|video_pad|> (videos are not trained here)."""
    vision_start_token_id: int = 151652
    """<|vision_start|>, before each image's pads."""
    vision_end_token_id: int = 151653
    """<|vision_end|>, after them."""
    mask_token_id: int = 151665
    """<|mask|>: MoCa's MLM mask token (the first id after Qwen2.5-VL's added tokens)."""
    pad_token_id: int = 151643
    """<|endoftext|>, used as padding."""


@dataclass
class ModelConfig:
    """A bidirectional (or causal) Qwen2.5-VL built on Megatron-Core."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower shapes."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Language model shapes."""
    tokens: TokenIds = field(default_factory=TokenIds)
    """Special token ids."""
    attention: str = "bidirectional"
    """LLM self-attention: 'bidirectional' (MoCa) or 'causal' (stock Qwen, the paper's baseline)."""
    attention_backend: str = "auto"
    """Core attention: auto | te | flash | flex | sdpa | local (see megatron_moca.models.specs)."""
    params_dtype: str = "float32"
    """Parameter dtype: float32 (CPU tests, master weights) or bfloat16."""
    fp8: Optional[str] = None
    """FP8 GEMMs in the LLM's layers through Transformer Engine (the te backend, Hopper or newer):
    None (off), 'hybrid' (e4m3 forward, e5m2 gradients: the usual training choice) or 'e4m3'. The vision
    tower, the output layer and the MAE decoder stay in params_dtype. Rows should be padded to a multiple
    of 16 (data.pad_to_multiple)."""
    fp8_recipe: str = "delayed"
    """Transformer Engine's scaling recipe: delayed, tensorwise, blockwise or mxfp8 (Blackwell)."""
    recompute_granularity: Optional[str] = None
    """Activation recompute, to fit long packed rows: None (keep every activation), 'full' (every LLM
    layer and ViT block keeps only its input and runs its forward again in the backward pass: about a
    third more compute) or 'selective' (the LLM's core attention only: worth it with the dense `local`
    attention; the flash/flex/TE kernels already keep no attention matrix)."""
    recompute_num_layers: int = 1
    """'full': LLM layers per recomputed chunk (megatron's uniform method)."""

    def validate(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
        """Raise UserError naming the first inconsistent field."""
        lang, vis = self.language, self.vision
        if self.attention not in ATTENTION_MODES:
            raise UserError(f"model.attention={self.attention!r}: expected one of {ATTENTION_MODES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UserError(
                f"model.attention_backend={self.attention_backend!r}: expected one of {ATTENTION_BACKENDS}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise UserError(f"model.params_dtype={self.params_dtype!r}: expected one of {PARAMS_DTYPES}")
        if self.recompute_granularity is not None and self.recompute_granularity not in RECOMPUTE:
            raise UserError(f"model.recompute_granularity={self.recompute_granularity!r}: expected null or one of "
                            f"{RECOMPUTE}")
        if self.recompute_num_layers < 1:
            raise UserError(f"model.recompute_num_layers={self.recompute_num_layers}: must be >= 1")
        if self.fp8 is not None:
            if self.fp8 not in FP8_FORMATS:
                raise UserError(f"model.fp8={self.fp8!r}: expected null or one of {FP8_FORMATS}")
            if self.fp8_recipe not in FP8_RECIPES:
                raise UserError(f"model.fp8_recipe={self.fp8_recipe!r}: expected one of {FP8_RECIPES}")
            if self.attention_backend not in ("auto", "te"):
                raise UserError(f"model.fp8 runs through Transformer Engine: attention_backend must be 'te' or "
                                f"'auto', not {self.attention_backend!r}")
        if lang.hidden_size % lang.num_attention_heads:
            raise UserError("model.language.hidden_size must be divisible by num_attention_heads")
        if lang.num_attention_heads % lang.num_query_groups:
            raise UserError("model.language.num_attention_heads must be divisible by num_query_groups")
        if 2 * sum(lang.mrope_section) != lang.head_dim:
            raise UserError(
                f"model.language.mrope_section={lang.mrope_section} must sum to head_dim/2 = {lang.head_dim // 2}")
        if vis.hidden_size % vis.num_heads or vis.head_dim % 4:
            raise UserError("model.vision.hidden_size/num_heads must give a head_dim divisible by 4 (2-D rotary)")
        if vis.window_size % (vis.spatial_merge_size * vis.patch_size):
            raise UserError("model.vision.window_size must be a multiple of spatial_merge_size * patch_size")
        bad = [i for i in vis.fullatt_block_indexes if not 0 <= i < vis.depth]
        if bad:
            raise UserError(f"model.vision.fullatt_block_indexes {bad} are outside 0..{vis.depth - 1}")
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise UserError("tensor/pipeline model parallel sizes must be >= 1")
        if lang.num_query_groups % tp:
            raise UserError(
                f"tensor_model_parallel_size={tp} must divide the {lang.num_query_groups} KV heads "
                f"(num_query_groups); use a TP size in {[d for d in range(1, lang.num_query_groups + 1) if lang.num_query_groups % d == 0]}")
        if vis.intermediate_pad_multiple < 1:
            raise UserError(f"model.vision.intermediate_pad_multiple={vis.intermediate_pad_multiple}: must be >= 1")
        for name, val in (("vision.num_heads", vis.num_heads),
                          ("vision.intermediate_size after padding to vision.intermediate_pad_multiple",
                           vis.padded_intermediate_size),
                          ("language.ffn_hidden_size", lang.ffn_hidden_size), ("language.vocab_size", lang.vocab_size),
                          ("vision merger width", vis.hidden_size * vis.merge_unit)):
            if val % tp:
                raise UserError(f"tensor_model_parallel_size={tp} must divide model.{name}={val}")
        if lang.num_layers % pp:
            raise UserError(f"pipeline_model_parallel_size={pp} must divide model.language.num_layers={lang.num_layers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def expand_config(cls, values: dict, prefix: str = "model") -> dict:
        """A config section's keys over the named preset's (`preset: tiny`; default: the 3B shapes)."""
        from megatron_moca.config.loading import merge

        values = dict(values)
        name = values.pop("preset", None)
        return merge(preset(name).to_dict(), values) if name else values

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of to_dict (model.json of a checkpoint): the loader's checks and coercions."""
        from megatron_moca.config.loading import build

        return build(cls, d, "model")


def preset(name: str) -> ModelConfig:
    """Named shapes: 'tiny' (tests, demo), 'qwen25vl_3b', 'qwen25vl_7b' (exact Qwen2.5-VL shapes)."""
    if name == "qwen25vl_3b":
        return ModelConfig()
    if name == "qwen25vl_7b":
        return ModelConfig(language=LanguageConfig(num_layers=28, hidden_size=3584, num_attention_heads=28,
                                                   num_query_groups=4, ffn_hidden_size=18944, vocab_size=152064,
                                                   tie_word_embeddings=False))
    if name == "tiny":
        return ModelConfig(
            vision=VisionConfig(depth=4, hidden_size=64, num_heads=4, intermediate_size=96,
                                fullatt_block_indexes=[1, 3]),
            language=LanguageConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                    ffn_hidden_size=128, vocab_size=151936, mrope_section=[2, 3, 3],
                                    max_position_embeddings=32768))
    raise UserError(f"unknown model preset {name!r}: expected tiny, qwen25vl_3b or qwen25vl_7b")
