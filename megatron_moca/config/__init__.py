"""Typed configuration dataclasses."""

from megatron_moca.config.model import LanguageConfig, ModelConfig, TokenIds, VisionConfig, preset

__all__ = ["LanguageConfig", "ModelConfig", "TokenIds", "VisionConfig", "preset"]
