"""Data: shard format, tokenizer, image processing, sample building, packing, loaders."""
