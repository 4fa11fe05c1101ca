"""Stand-ins for GPU-only libraries: small torch implementations of a library's documented contract, so the
project's own wiring around the library (what it passes, in which layout, with which flags) runs for real
on a machine without it - in CI, on the CPU.

    MOCA_STANDINS=te        megatron's TEDotProductAttention over Transformer Engine's DotProductAttention
                            (standins/te_attention.py): sbhd and thd layouts, cu_seqlens, mask types, GQA
    MOCA_STANDINS=dali_gpu  a DALI pipeline on a GPU (standins/dali_gpu.py): the GPU graph defined and checked
                            by DALI itself, executed by its CPU operators

A stand-in is used only where it is asked for (MOCA_STANDINS, set by the simulated test tier) AND the real
library (for DALI's GPU operators: CUDA) is absent; where it is there, the real path runs whatever the
variable says. Nothing a user runs selects a stand-in by default.
"""

from __future__ import annotations

import importlib.util
import os


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


STANDINS = {"te": lambda: _module_present("transformer_engine"), "dali_gpu": _cuda_present}
"""Stand-in name -> whether what it stands in for is really there (then the stand-in is never used)."""


def enabled(name: str) -> bool:
    """Whether the stand-in `name` replaces its library in this process."""
    if name not in os.environ.get("MOCA_STANDINS", "").split(","):
        return False
    return not STANDINS[name]()
