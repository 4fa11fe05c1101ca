"""models/compile.py: compiled blocks compute what the eager model computes, names unchanged.

Traced with the aot_eager backend (dynamo + AOT autograd, no code generation) to keep CPU time low;
the GPU test runs inductor.
"""

import pytest
import torch
from helpers import build_batch, tiny_config, two_documents_in_row0
from helpers import hidden_and_grads as _step

from megatron_moca.models import transformer_configs
from megatron_moca.models.compile import compile_model
from megatron_moca.models.vlm import MocaVLM


@pytest.mark.parametrize("fused_swiglu", [False, True], ids=["plain", "fused_swiglu"])
def test_compiled_blocks_match_eager(megatron_runtime, monkeypatch, fused_swiglu):
    """fused_swiglu: megatron's torch.compile'd SwiGLU (on by default with CUDA) nested in the blocks."""
    monkeypatch.setattr(transformer_configs, "fuse_activations", lambda: fused_swiglu)
    cfg = tiny_config()
    cfg.attention, cfg.attention_backend = "bidirectional", "sdpa"  # flex has no CPU backward
    torch.manual_seed(0)
    model = MocaVLM(cfg)
    ids, mask, pixels, grid = build_batch(cfg, [[(1, 6, 10)], [(1, 4, 4)]], seed=3)
    packed = two_documents_in_row0(cfg, ids, mask)
    with torch.compiler.set_stance("force_eager"):  # megatron's compiled SwiGLU as plain Python here
        eager = [_step(model, ids, pixels, grid), _step(model, ids, pixels, grid, document_ids=packed)]
    names = sorted(model.state_dict())

    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no compiled code cached from an earlier test: every graph break is traced anew
    counters.clear()
    compiled = compile_model(model, backend="aot_eager")
    assert len(compiled) == cfg.language.num_layers + cfg.vision.depth
    assert sorted(model.state_dict()) == names
    again = [_step(model, ids, pixels, grid), _step(model, ids, pixels, grid, document_ids=packed)]
    # the only graph breaks are the deliberately eager core attention calls (no megatron warnings etc.)
    assert counters["graph_break"] and all("TorchCoreAttention.forward" in reason for reason in counters["graph_break"])
    for (h0, g0), (h1, g1) in zip(eager, again):
        assert (h0 - h1).abs().max().item() <= 1e-5
        assert g0.keys() == g1.keys()
        for name in g0:
            assert (g0[name] - g1[name]).abs().max().item() <= 1e-5 * max(1.0, g0[name].abs().max().item()), name


def test_compiled_mae_decoder_matches_eager(megatron_runtime):
    """The stage-1 MAE decoder's layer is compiled like the LLM layers; its predictions stay the same."""
    from megatron_moca.models.heads import initialize_mae_decoder

    cfg = tiny_config()
    cfg.attention_backend = "sdpa"
    torch.manual_seed(1)
    model = MocaVLM(cfg, mae_decoder=True)
    initialize_mae_decoder(model)
    ids, mask, pixels, grid = build_batch(cfg, [[(1, 4, 4)]], seed=4)
    select = ids == cfg.tokens.image_token_id

    def predictions():
        hidden = torch.randn(ids.shape[1], ids.shape[0], cfg.language.hidden_size, generator=torch.Generator().manual_seed(0))
        return model.mae_predictions(hidden, select, ids, image_grid_thw=grid)

    eager = predictions()
    torch._dynamo.reset()
    assert "mae_decoder.layer" in compile_model(model, backend="aot_eager")
    torch.testing.assert_close(predictions(), eager, rtol=1e-5, atol=1e-5)
