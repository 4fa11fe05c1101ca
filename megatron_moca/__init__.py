"""megatron_moca: MoCa bidirectional multimodal embeddings on Megatron-Core.

Importing the package is cheap and never imports Transformer Engine, DALI, flash-attn or
megatron-core: heavy modules are imported where they are used.
"""

__version__ = "0.1.0"

from megatron_moca import compat as _compat

# megatron-core warns at import time about optional GPU packages; `moca env` reports them instead
_compat.quiet_import_warnings()
