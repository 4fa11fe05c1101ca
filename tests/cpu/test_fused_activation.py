"""With megatron-core's fused SwiGLU (on by default where CUDA is available) the model computes what
it computes with the plain ops: outputs and gradients, ViT (with MLP biases) and LLM."""

import torch
from helpers import build_batch, hidden_and_grads, tiny_config

from megatron_moca.models import transformer_configs
from megatron_moca.models.vlm import MocaVLM


def build(monkeypatch, fused: bool):
    monkeypatch.setattr(transformer_configs, "fuse_activations", lambda: fused)
    torch.manual_seed(0)
    model = MocaVLM(tiny_config())
    with torch.no_grad():  # megatron zero-initialises biases: make the ViT's count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_fused_swiglu_matches_plain_ops(megatron_runtime, monkeypatch):
    plain, fused = build(monkeypatch, False), build(monkeypatch, True)
    assert fused.language.decoder.layers[0].mlp.config.bias_activation_fusion
    assert fused.vision.blocks[0].mlp.linear_fc1.skip_bias_add  # the bias goes to the fused kernel
    assert not plain.vision.blocks[0].mlp.linear_fc1.skip_bias_add  # ... or into the GEMM
    assert not fused.vision.blocks[0].mlp.linear_fc2.skip_bias_add  # fc2's always into the GEMM
    fused.load_state_dict(plain.state_dict())
    cfg = tiny_config()
    ids, _, pixels, grid = build_batch(cfg, [[(1, 6, 10)], [(1, 4, 4)]], seed=3)
    # megatron's fused functions are torch.compile'd; run them as plain Python here (no C++ build on the CPU)
    with torch.compiler.set_stance("force_eager"):
        got_hidden, got = hidden_and_grads(fused, ids, pixels, grid)
    ref_hidden, ref = hidden_and_grads(plain, ids, pixels, grid)
    torch.testing.assert_close(got_hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
