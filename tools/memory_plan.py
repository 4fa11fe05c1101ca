#!/usr/bin/env python
"""Predicted peak GPU memory per process of a stage-1 or stage-2 recipe, and whether it fits.

    python tools/memory_plan.py examples/finetune_qwen25vl_7b.yaml --gpus 8 [--gpu-gib 80] [key=value ...]
    python tools/memory_plan.py examples/pretrain_qwen25vl_3b.yaml --gpus 64

Parameters are counted exactly (the HF Qwen2.5-VL model of the recipe's shapes built on the meta device);
everything else is the arithmetic below, per process, in GiB:

  stage 2 (transformers, training/finetune.py)
    states      fp32 weights 4P + fp32 gradients 4P + AdamW moments 8P bytes: FSDP divides all three by
                the shard group (parallel.fsdp_shard_size, default all ranks); the replicated path keeps
                weights and gradients whole and divides the moments by the ranks (ZeRO-1)
    gathered    FSDP: the largest unit (the root: embeddings) in the compute dtype plus two decoder layers
                (one computing, one prefetched)
    activations tokens alive at once = micro_batch_size x max_length with GradCache (one chunk), else
                the rank's queries + positives + hard negatives x max_length; per token and LLM layer
                2 (10 h + 4 ffn) bytes (bf16: the inputs of the norms, QKV, attention, output projection
                and SwiGLU kept for backward, flash/SDPA attention: no s x s scores), or 2 h with
                per-layer checkpointing plus one layer recomputed; the vision tower likewise per patch
                (every input an image at max_pixels: the bound)
  stage 1 (megatron-core, training/pretrain.py)
    states      weights in params_dtype + fp32 main gradients (megatron DDP buffer) per TP x PP shard;
                the optimizer's fp32 main weights (bf16 runs) + moments, divided by DP with the
                distributed optimizer
    activations micro_batch_size x pack_length tokens over this stage's L / PP layers, / TP; full
                recompute keeps 2 h per layer per token; image patches: --image-fraction of the tokens
                are image tokens (4 patches each); MLM logits for mlm_probability of the tokens in
                bf16 + fp32 (V / TP wide)
  + 2 GiB for the CUDA context and communication buffers; "fits" leaves 10% of the card free.

Validated on what can be measured here: the parameter and optimizer-state bytes of a tiny CPU run
(tests/unit/test_memory_plan.py). The activation terms are estimates; the 15% check against a GPU's
max_memory_allocated is recorded in benchmarks/RESULTS.md when a GPU is lent ("not measured" until then).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30
OVERHEAD_GIB = 2.0
HEADROOM = 0.9  # "fits" leaves 10% of the card to the allocator's fragmentation


@dataclass
class Shapes:
    params: int
    """All parameters of the HF model (vision tower, merger, LLM, lm_head where untied)."""
    encoder_params: int
    """What stage 2 trains: everything but an untied lm_head."""
    root_params: int
    """Parameters outside the decoder layers and vision blocks (embeddings, norms, patch embedding, merger)."""
    layer_params: int
    hidden: int
    ffn: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_ffn: int
    vision_blocks: int
    patch_pixels: int
    """Pixels per 14 x 14 patch (one row of pixel_values per patch)."""


def model_shapes(cfg) -> Shapes:
    """Exact parameter counts of the HF model with these shapes (built on the meta device: no memory)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_moca.conversion.hf_config import hf_config_from_model

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(hf_config_from_model(cfg)))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total = count(model)
    encoder = count(model.model)
    layers = model.model.language_model.layers
    blocks = model.model.visual.blocks
    root = encoder - sum(count(m) for m in layers) - sum(count(b) for b in blocks)
    lang, vis = cfg.language, cfg.vision
    return Shapes(total, encoder, root, count(layers[0]), lang.hidden_size, lang.ffn_hidden_size, lang.num_layers,
                  lang.vocab_size, vis.hidden_size, vis.intermediate_size, vis.depth, vis.patch_size ** 2)


def _per_token_layer_bytes(hidden: int, ffn: int) -> int:
    return 2 * (10 * hidden + 4 * ffn)


def _activations(tokens: float, patches: float, s: Shapes, checkpointed: bool, layers: int = None,
                 tp: int = 1) -> float:
    layers = s.layers if layers is None else layers
    full_llm = _per_token_layer_bytes(s.hidden, s.ffn) * tokens / tp
    full_vit = _per_token_layer_bytes(s.vision_hidden, s.vision_ffn) * patches / tp
    if checkpointed:  # each layer's input kept, one layer's activations alive during its recompute
        kept = (2 * s.hidden * tokens * layers + 2 * s.vision_hidden * patches * s.vision_blocks) / tp
        return kept + full_llm + full_vit
    return full_llm * layers + full_vit * s.vision_blocks


def stage2_plan(cfg, s: Shapes, gpus: int) -> Dict[str, float]:
    p = cfg.parallel
    P = s.encoder_params
    group = (p.fsdp_shard_size or gpus) if p.fsdp else 1
    if p.fsdp:
        states = {"weights": 4 * P / group, "gradients": 4 * P / group, "optimizer": 8 * P / group}
        compute = 2 if cfg.model.compute_dtype == "bfloat16" else 4
        states["gathered units"] = compute * (s.root_params + 2 * s.layer_params) + 4 * s.root_params  # + root grads
    else:
        moments = 8 * P / gpus if p.use_distributed_optimizer else 8 * P
        states = {"weights": 4 * P, "gradients": 4 * P, "optimizer": moments}
    per_rank = cfg.train.global_batch_size // gpus
    length = cfg.data.max_length
    if cfg.train.micro_batch_size:
        inputs = min(cfg.train.micro_batch_size, per_rank * max(cfg.objective.hard_negatives, 1))
    else:
        inputs = per_rank * (2 + cfg.objective.hard_negatives)
    patches = inputs * cfg.data.image.max_pixels / (s.patch_pixels)
    states["activations"] = _activations(inputs * length, patches, s, cfg.model.gradient_checkpointing)
    return states


def stage1_plan(cfg, s: Shapes, gpus: int, image_fraction: float) -> Dict[str, float]:
    p, m = cfg.parallel, cfg.model
    shard = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    dp = gpus // shard
    P = s.params / shard
    weight_bytes = 2 if m.params_dtype in ("bfloat16", "float16") else 4
    main = 4 * P if weight_bytes == 2 else 0  # fp32 main weights of a bf16 run
    optimizer = main + 8 * P
    states = {"weights": weight_bytes * P, "gradients": 4 * P,
              "optimizer": optimizer / dp if p.use_distributed_optimizer else optimizer}
    tokens = cfg.train.micro_batch_size * cfg.data.pack_length
    patches = 4 * image_fraction * tokens
    layers = -(-s.layers // p.pipeline_model_parallel_size) + 1  # + the MAE decoder's layer
    states["activations"] = _activations(tokens, patches, s, m.recompute_granularity == "full", layers,
                                         p.tensor_model_parallel_size)
    masked = cfg.sample.mlm_probability * (1 - image_fraction) * tokens
    states["MLM logits"] = masked * s.vocab / p.tensor_model_parallel_size * (2 + 4)
    return states


def _recipe_stage(values: dict) -> int:
    return 2 if "temperature" in (values.get("objective") or {}) else 1


def plan(recipe: str, gpus: int, overrides: List[str] = (),
         image_fraction: float = 0.25) -> Tuple[int, Dict[str, float]]:
    """(stage, {component: bytes per process}) of a recipe on `gpus` processes."""
    from megatron_moca.config.loading import read_yaml
    from megatron_moca.config.model import preset

    stage = _recipe_stage(read_yaml(recipe))
    if stage == 2:
        from megatron_moca.config.finetune import load_finetune_config

        cfg = load_finetune_config(recipe, overrides)
        name = os.path.basename(recipe)
        model = "qwen25vl_7b" if "7b" in name else "qwen25vl_3b" if "3b" in name else "tiny"
        if cfg.model.path and os.path.isfile(os.path.join(cfg.model.path, "config.json")):
            from megatron_moca.conversion.hf_config import model_config_from_hf
            from megatron_moca.conversion.hf_io import read_config

            shapes = model_shapes(model_config_from_hf(read_config(cfg.model.path)))
        else:
            shapes = model_shapes(preset(model))
        return 2, stage2_plan(cfg, shapes, gpus)
    from megatron_moca.config.pretrain import load_pretrain_config

    cfg = load_pretrain_config(recipe, overrides)
    return 1, stage1_plan(cfg, model_shapes(cfg.model), gpus, image_fraction)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a stage-1 (pretrain_*) or stage-2 (finetune_*) YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as on the moca command line")
    parser.add_argument("--gpus", type=int, required=True, help="processes (GPUs) of the run")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--image-fraction", type=float, default=0.25,
                        help="stage 1: share of a packed row's tokens that are image tokens (default 0.25)")
    args = parser.parse_intermixed_args(argv)
    from megatron_moca.errors import UserError

    if args.gpus < 1:
        parser.error("--gpus must be >= 1")
    try:
        stage, parts = plan(args.recipe, args.gpus, args.overrides, args.image_fraction)
    except UserError as e:  # a bad recipe or override: one line, as the moca CLI says it
        print(f"memory_plan: error: {e}", file=sys.stderr)
        return 2
    total = sum(parts.values()) / GIB + OVERHEAD_GIB
    print(f"{args.recipe} (stage {stage}) on {args.gpus} GPUs, per GPU:")
    for name, value in parts.items():
        print(f"  {name:<16} {value / GIB:8.1f} GiB")
    print(f"  {'overhead':<16} {OVERHEAD_GIB:8.1f} GiB")
    fits = total <= HEADROOM * args.gpu_gib
    print(f"  {'peak':<16} {total:8.1f} GiB of {args.gpu_gib:g}: {'fits' if fits else 'DOES NOT FIT'} "
          f"(with {100 - 100 * HEADROOM:.0f}% headroom)")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
