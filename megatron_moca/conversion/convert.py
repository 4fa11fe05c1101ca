"""`moca convert hf-to-mcore` and `moca convert mcore-to-hf`: one CPU process, about one model copy.

Both directions build the unsharded model (TP=1, PP=1) without initialising it, stream tensors
through the mapping table one at a time, and write into a sibling staging folder that is renamed
onto the output only when complete: a failed conversion leaves nothing behind, and an existing
non-empty output is refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Optional


from megatron_moca.checkpointing import load_model, read_model_config, resolve_checkpoint, save_model
from megatron_moca.conversion.hf_config import declare_bidirectional, hf_config_from_model, model_config_from_hf
from megatron_moca.conversion.hf_io import (SafetensorsReader, copy_side_files, read_config, write_embedding_settings,
                                            write_sharded)
from megatron_moca.conversion.mapping import build_rules
from megatron_moca.conversion.weights import check_hf_keys, load_hf_into_model, model_to_hf
from megatron_moca.errors import UserError
from megatron_moca.models.transformer_configs import DTYPES
from megatron_moca.progress import progress_bar, with_progress

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def check_output_dir(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"{path}: output exists and is not an empty directory; choose a new path")


@contextlib.contextmanager
def staged_output(path: str, command: str = "moca convert"):
    """Yield a staging folder next to `path` (ownership.staged: renamed onto `path` on success, deleted on
    failure, reused after a kill); `path` must be new or empty."""
    from megatron_moca.ownership import staged

    check_output_dir(path)
    with staged(path, command) as folder:
        yield folder


def _unsharded_model(cfg):
    import torch

    from megatron_moca.distributed import runtime
    from megatron_moca.models.vlm import MocaVLM

    if torch.cuda.is_available():
        # megatron would allocate the whole unsharded model on one GPU and verify would mix devices
        raise UserError("conversion runs on the CPU: use `moca convert`, which hides the GPUs, or start "
                        "this process with CUDA_VISIBLE_DEVICES=")
    runtime.initialize(1, 1)
    cfg.attention_backend = "sdpa" if cfg.attention_backend in ("te", "flash") else cfg.attention_backend
    return MocaVLM(cfg, initialize=False)


def hf_to_mcore(hf_dir: str, output: str, tp: int = 1, pp: int = 1, attention: str = "bidirectional") -> dict:
    """Convert a HF Qwen2.5-VL folder to a megatron_moca dist checkpoint; returns a summary."""
    t0 = time.time()
    check_output_dir(output)
    cfg = model_config_from_hf(read_config(hf_dir), os.path.join(hf_dir, "config.json"))
    cfg.attention = attention
    cfg.validate(tp, pp)
    reader = SafetensorsReader(hf_dir)
    check_hf_keys(reader.keys(), cfg, hf_dir)
    dtype = reader.get("model.norm.weight").dtype
    cfg.params_dtype = DTYPE_NAMES.get(dtype, "float32")
    model = _unsharded_model(cfg)
    bar = progress_bar("reading HF tensors", len(reader.keys()), "tensor")

    def get(name):
        bar.update(1)
        return reader.get(name)

    load_hf_into_model(model, get, cfg, hf_dir)
    bar.close()
    print("writing the megatron checkpoint", file=sys.stderr, flush=True)
    with staged_output(output) as staging:
        # torch_dist checkpoints hold global tensors: they load at any TP/PP; tp/pp were validated
        save_model(model, cfg, staging, 0, release_params=True, extra={"converted_from": os.path.abspath(hf_dir),
                                                  "target_layout": {"tensor_model_parallel_size": tp,
                                                                    "pipeline_model_parallel_size": pp}})
    return {"output": output, "seconds": round(time.time() - t0, 2), "dtype": cfg.params_dtype}


def mcore_to_hf(checkpoint: str, output: str, hf_base: str = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Convert a megatron_moca dist checkpoint (any TP/PP it was saved at) to a HF folder."""
    t0 = time.time()
    check_output_dir(output)
    folder = resolve_checkpoint(checkpoint)
    if hf_base is not None and not os.path.isdir(hf_base):
        raise UserError(f"--hf-base {hf_base}: not a directory")
    cfg = read_model_config(folder)
    model = _unsharded_model(cfg)
    print(f"reading {folder}", file=sys.stderr, flush=True)
    load_model(model, folder)
    config = hf_config_from_model(cfg, cfg.params_dtype)
    if hf_base is not None and os.path.isfile(os.path.join(hf_base, "config.json")):
        _carry_unmodelled_fields(read_config(hf_base), config)
    if cfg.attention == "bidirectional":  # a MoCa checkpoint: plain AutoModel must run it bidirectionally too
        declare_bidirectional(config)
    run_config = read_run_config(folder)
    settings = run_embedding_settings(run_config) if run_config else {}
    training = run_training_record(folder, run_config["values"]) if run_config else None
    with staged_output(output) as staging:
        tensors = sum(len(rule.hf) for rule in build_rules(cfg))
        files = write_sharded(with_progress(model_to_hf(model, cfg), "writing HF tensors", tensors, "tensor"),
                              staging, max_shard_bytes)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        copied = copy_side_files(hf_base, staging)
        if settings:
            from megatron_moca.embed.model_card import write_model_card, write_training_record

            write_embedding_settings(staging, **settings)
            write_training_record(staging, training)
            write_model_card(staging)
    return {"output": output, "seconds": round(time.time() - t0, 2), "shards": len(files), "copied": copied,
            "embedding": settings}


# vision_config fields the ModelConfig does not model: the export takes the base's values where it has one
UNMODELLED_VISION_FIELDS = ("tokens_per_second",)


def _carry_unmodelled_fields(base: dict, config: dict) -> None:
    theirs = base.get("vision_config") if isinstance(base.get("vision_config"), dict) else {}
    for key in UNMODELLED_VISION_FIELDS:
        if key in theirs:
            config["vision_config"][key] = theirs[key]


def read_run_config(folder: str) -> Optional[dict]:
    """{"path", "values"} of the config.yaml of the `moca pretrain` run directory holding the iter_ folder;
    None for a checkpoint outside a run (e.g. a converted model). Read once per export."""
    from megatron_moca.config.loading import read_yaml

    path = os.path.join(os.path.dirname(os.path.normpath(folder)), "config.yaml")
    return {"path": path, "values": read_yaml(path)} if os.path.isfile(path) else None


def run_training_record(folder: str, run: dict) -> dict:
    """What a `moca pretrain` run (its resolved config `run`) did up to this iter_ folder, from the
    checkpoint's metadata: the export's moca_training.json and model card."""
    from megatron_moca import __version__
    from megatron_moca.checkpointing import read_checkpoint_json

    meta = read_checkpoint_json(folder)
    train, optim, data = run.get("train") or {}, run.get("optim") or {}, run.get("data") or {}
    sample, objective = run.get("sample") or {}, run.get("objective") or {}
    return {"stage": "MoCa stage 1: modality-aware continual pre-training (MLM + MAE)",
            "base_model": (run.get("checkpoint") or {}).get("load") or "random initialisation",
            "steps": meta.get("iteration"), "consumed_tokens": int(meta.get("consumed_tokens", 0)),
            "global_batch_size": train.get("global_batch_size"), "megatron_moca": __version__,
            "data": {"paths": data.get("paths", [])},
            "hyperparameters": {"lr": optim.get("lr"), "lr_decay_style": optim.get("lr_decay_style"),
                                "clip_grad": optim.get("clip_grad"), "pack_length": data.get("pack_length"),
                                "mlm_probability": sample.get("mlm_probability"),
                                "mae_probability": sample.get("mae_probability"),
                                "mae_weight": objective.get("mae_weight"), "max_length": sample.get("max_length")}}


def run_embedding_settings(run_config: dict) -> dict:
    """The sequence length and pixel bounds a `moca pretrain` run trained with (read_run_config's result)."""
    path = run_config["path"]
    sample = run_config["values"].get("sample") or {}
    image = sample.get("image") or {}
    settings = {"min_pixels": image.get("min_pixels"), "max_pixels": image.get("max_pixels"),
                "max_length": sample.get("max_length")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in settings.values()):
        raise UserError(f"{path}: sample.max_length / sample.image.min_pixels / max_pixels are not positive "
                        "integers; is this the config.yaml `moca pretrain` wrote?")
    return settings
