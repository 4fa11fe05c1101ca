"""The language model's rotary (models/rotary.py, compat.route_megatron_rotary) against megatron-core's."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megatron_attention_rotary_is_bit_identical_and_falls_back(megatron_runtime, dtype):
    """The LLM's M-RoPE through half_rotary equals megatron-core's own apply_rotary_pos_emb (angles from
    megatron's MultimodalRotaryEmbedding), forward and backward; other cases reach megatron's function."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb as megatron_rope
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from megatron.core.transformer import attention
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moca import compat

    compat.route_megatron_rotary()
    compat.route_megatron_rotary()  # idempotent
    ours = attention.apply_rotary_pos_emb
    assert ours is not megatron_rope and getattr(ours, "_moca_half_rotary", False)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, mrope_section=[2, 3, 3])
    g = torch.Generator().manual_seed(0)
    s, b, heads, d = 40, 2, 4, 16
    position_ids = torch.randint(0, 5000, (3, b, s), generator=g)
    freqs = MultimodalRotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=1000000)(
        position_ids, mrope_section=[2, 3, 3])
    assert torch.equal(freqs[..., : d // 2], freqs[..., d // 2:])  # what half_rotary relies on
    t = torch.randn(s, b, heads, d, generator=g).to(dtype).requires_grad_()
    upstream = torch.randn(s, b, heads, d, generator=g).to(dtype)
    results = []
    for fn in (megatron_rope, ours):
        t.grad = None
        out = fn(t, freqs, config=config)
        out.backward(upstream)
        results.append((out.detach(), t.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # partial rotary (freqs narrower than the head) is not the plain case: megatron's function runs
    narrow = freqs[..., : d // 2].contiguous()
    assert torch.equal(ours(t, narrow, config=config), megatron_rope(t, narrow, config=config))


def test_the_model_takes_the_fast_path_for_q_and_k_of_every_layer(megatron_runtime, monkeypatch):
    """megatron's Attention passes its own arguments (mscale, cp_group, ...): the plain case must still be
    recognised, or the optimisation would silently never run."""
    from helpers import tiny_config

    from megatron_moca.models import rotary
    from megatron_moca.models.vlm import MocaVLM

    calls = []
    original = rotary.half_rotary
    monkeypatch.setattr(rotary, "half_rotary", lambda *args: calls.append(args[0].shape) or original(*args))
    cfg = tiny_config()
    model = MocaVLM(cfg)
    model(torch.randint(0, 1000, (2, 16)))
    heads, groups = cfg.language.num_attention_heads, cfg.language.num_query_groups
    assert len(calls) == 2 * cfg.language.num_layers
    assert sorted({tuple(s)[2] for s in calls}) == sorted({heads, groups})  # q and k of each layer
