"""megatron_moca: MoCa bidirectional multimodal embeddings on Megatron-Core.

Importing the package is cheap and never imports Transformer Engine, DALI, flash-attn or
megatron-core: heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
