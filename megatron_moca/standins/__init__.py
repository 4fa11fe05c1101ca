"""Stand-ins for GPU-only libraries: small torch implementations of a library's documented contract, so the
project's own wiring around the library (what it passes, in which layout, with which flags) runs for real
on a machine without it - in CI, on the CPU.

    MOCA_STANDINS=te        megatron's TEDotProductAttention over Transformer Engine's DotProductAttention
                            (standins/te_attention.py): sbhd and thd layouts, cu_seqlens, mask types, GQA

A stand-in is used only where it is asked for (MOCA_STANDINS, set by the simulated test tier) AND the real
library is absent; where the library imports, the real path runs whatever the variable says. Nothing a
user runs selects a stand-in by default.
"""

from __future__ import annotations

import importlib.util
import os

STANDINS = {"te": "transformer_engine"}
"""Stand-in name -> the module whose absence it covers."""


def enabled(name: str) -> bool:
    """Whether the stand-in `name` replaces its library in this process."""
    if name not in os.environ.get("MOCA_STANDINS", "").split(","):
        return False
    try:
        return importlib.util.find_spec(STANDINS[name]) is None
    except (ImportError, ValueError):
        return True
