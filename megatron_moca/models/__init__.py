"""The model: bidirectional Qwen2.5-VL on megatron-core (vision tower, LLM, attention backends)."""
