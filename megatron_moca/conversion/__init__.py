"""Checkpoint conversion between Hugging Face Qwen2.5-VL folders and megatron_moca dist checkpoints."""
