"""MoCa's stage-1 MAE decoder, on the last pipeline stage.

ONE extra transformer layer of the LLM's own spec (width, heads, FFN, attention mode), run over the
whole final hidden sequence with the same positions and mask, initialised as a copy of LLM layer
L//2 (`initialize_mae_decoder`), then Linear(hidden -> merge_unit * patch_dim = 4 x 1176 = 4704, bias;
weight N(0, 0.02), bias 0), applied only where a prediction is wanted (masked image tokens). The
linear is replicated over tensor-parallel ranks (its input, the layer's output, is replicated too); it
is drawn from the default generator, which every TP rank of a stage seeds and consumes alike
(distributed/runtime.seed_all), so the replicas start equal (tested at TP=2). No sequence parallelism.

The MLM head needs no module: it is the model's output layer at masked positions (MocaVLM.logits).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from megatron_moca.errors import UserError

MAE_INIT_STD = 0.02


class MaeDecoder(MegatronModule):
    def __init__(self, config, layer_spec, out_features: int, layer_number: int):
        """layer_number: this stage's local number for the extra layer (one past its last LLM layer)."""
        super().__init__(config=config)
        self.layer = build_module(layer_spec, config=config, layer_number=layer_number)
        self.predict = nn.Linear(config.hidden_size, out_features, bias=True, dtype=config.params_dtype)
        with torch.no_grad():
            self.predict.weight.normal_(0.0, MAE_INIT_STD)
            self.predict.bias.zero_()

    def forward(self, hidden: torch.Tensor, attention_mask, rotary_pos_emb,
                select: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """hidden [s, b, h] (after the final norm) -> predictions [b, s, out], or [n, out] at the True
        positions of select [b, s] in row-major (batch, then sequence) order. packed_seq_params: the LLM's
        (Transformer Engine's THD layout for packed rows)."""
        out, _ = self.layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                            packed_seq_params=packed_seq_params)
        out = out.transpose(0, 1)
        return self.predict(out if select is None else out[select])


def initialize_mae_decoder(model) -> int:
    """Copy LLM layer L//2 (0-based) into `model.mae_decoder.layer`; returns that index. With pipeline
    parallelism the layer may live on another stage: then every stage of the pipeline group must call
    this (a broadcast from the owning stage; every stage's layers share the same parameter shapes)."""
    target = model.cfg.language.num_layers // 2
    local = {layer.layer_number - 1: layer for layer in model.language.decoder.layers}  # global 0-based
    decoder = model.mae_decoder
    if model.post_process and decoder is None:
        raise UserError("initialize_mae_decoder: the model was built without mae_decoder=True")
    if ps.get_pipeline_model_parallel_world_size() == 1:
        decoder.layer.load_state_dict(local[target].state_dict())
        return target
    group = ps.get_pipeline_model_parallel_group()
    template = next(iter(local.values()))
    owner = torch.tensor([dist.get_rank() if target in local else -1], device=next(template.parameters()).device)
    dist.all_reduce(owner, op=dist.ReduceOp.MAX, group=group)
    state = (local[target] if target in local else template).state_dict()
    received = {}
    for name in sorted(state):  # the same names, in the same order, on every stage
        if torch.is_tensor(state[name]):
            buf = state[name].detach().clone() if target in local else torch.empty_like(state[name])
            dist.broadcast(buf, src=int(owner.item()), group=group)
            received[name] = buf
    if decoder is not None:
        full = decoder.layer.state_dict()  # non-tensor extra state (TE's) stays the decoder's own
        full.update(received)
        decoder.layer.load_state_dict(full)
    return target
