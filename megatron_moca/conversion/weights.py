"""Move weights between a HF tensor source and an unsharded (TP=1, PP=1) MocaVLM, rule by rule."""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch

from megatron_moca.config.model import ModelConfig
from megatron_moca.conversion.mapping import build_rules, to_hf, to_mcore
from megatron_moca.errors import UserError


def check_hf_keys(keys, cfg: ModelConfig, source: str) -> None:
    """UserError if tensors are missing or unexpected (a tied lm_head copy is tolerated)."""
    expected = {k for rule in build_rules(cfg) for k in rule.hf}
    present = set(keys)
    missing = sorted(expected - present)
    extra = sorted(present - expected - ({"lm_head.weight"} if cfg.language.tie_word_embeddings else set()))
    if missing:
        raise UserError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    if extra:
        raise UserError(f"{source}: {len(extra)} unexpected tensors (not Qwen2.5-VL of these shapes?), "
                        f"e.g. {extra[:3]}")


@torch.no_grad()
def load_hf_into_model(model, get: Callable[[str], torch.Tensor], cfg: ModelConfig, source: str = "hf") -> None:
    """Copy every HF tensor (fetched lazily by `get`) into the matching parameter of an unsharded model."""
    params = dict(model.named_parameters())
    rules = build_rules(cfg)
    covered = {r.mcore for r in rules}
    if covered != set(params):
        raise RuntimeError(f"mapping does not match the model: unmapped {sorted(set(params) - covered)[:3]}, "
                           f"unknown {sorted(covered - set(params))[:3]}")
    for rule in rules:
        value = to_mcore(rule, [get(k) for k in rule.hf], cfg)
        param = params[rule.mcore]
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{source}: {rule.hf[0]} has shape {tuple(value.shape)} after mapping, "
                            f"the model expects {tuple(param.shape)} for {rule.mcore}")
        param.copy_(value)


def model_to_hf(model, cfg: ModelConfig, dtype: torch.dtype = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF on-disk name, tensor) pairs of an unsharded model, one rule at a time."""
    params = dict(model.named_parameters())
    for rule in build_rules(cfg):
        t = params[rule.mcore].detach()
        for name, value in to_hf(rule, t, cfg).items():
            yield name, (value if dtype is None else value.to(dtype))
