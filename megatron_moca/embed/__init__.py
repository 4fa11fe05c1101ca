"""Embeddings from a Hugging Face Qwen2.5-VL folder with MoCa's bidirectional attention."""
