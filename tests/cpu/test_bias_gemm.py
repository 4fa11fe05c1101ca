"""Linears with the bias inside the GEMM compute what megatron's linears compute, in one op less."""

import pytest
import torch
from helpers import OpNames

from megatron_moca.models.bias_gemm import (BiasInGemmColumnParallelLinear, BiasInGemmRowParallelLinear,
                                            MLPFc1BiasInGemm, MLPFc2BiasInGemm)


def vision_config():
    from megatron_moca.config.model import preset
    from megatron_moca.models.transformer_configs import vision_transformer_config

    return vision_transformer_config(preset("tiny"))


def run(module, x):
    x = x.clone().requires_grad_()
    with OpNames() as ops:
        out, bias = module(x)
        (out if bias is None else out + bias).pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return (out if bias is None else out + bias).detach(), grads, ops.names


@pytest.mark.parametrize("kind", ["column", "row"])
def test_same_outputs_and_gradients_as_megatron_with_the_bias_in_the_gemm(megatron_runtime, kind):
    from megatron.core import tensor_parallel

    config = vision_config()
    base_cls, ours_cls = ((tensor_parallel.ColumnParallelLinear, BiasInGemmColumnParallelLinear) if kind == "column"
                          else (tensor_parallel.RowParallelLinear, BiasInGemmRowParallelLinear))
    extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True, "skip_bias_add": False}
    torch.manual_seed(0)
    base = base_cls(48, 80, config=config, init_method=config.init_method, bias=True, **extra)
    ours = ours_cls(48, 80, config=config, init_method=config.init_method, bias=True, **extra)
    with torch.no_grad():
        ours.weight.copy_(base.weight)
        ours.bias.copy_(torch.randn(80))
        base.bias.copy_(ours.bias)
    x = torch.randn(37, 48)
    (ref, ref_grads, ref_ops), (got, got_grads, got_ops) = run(base, x), run(ours, x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert "addmm" in got_ops and "addmm" not in ref_ops
    assert got_ops.count("add") < ref_ops.count("add")


def test_megatron_mlp_gets_its_bias_already_added(megatron_runtime):
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core import tensor_parallel

    config = vision_config()
    torch.manual_seed(0)
    base = MLP(config, MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear,
                                     linear_fc2=tensor_parallel.RowParallelLinear))
    ours = MLP(config, MLPSubmodules(linear_fc1=MLPFc1BiasInGemm, linear_fc2=MLPFc2BiasInGemm))
    ours.load_state_dict(base.state_dict())
    with torch.no_grad():
        for module in (base, ours):  # megatron zero-initialises biases: make them count
            torch.manual_seed(1)
            module.linear_fc1.bias.normal_()
            module.linear_fc2.bias.normal_()
    x = torch.randn(37, 64)
    ref_out, ref_bias = base(x)
    out, bias = ours(x)
    assert ref_bias is not None and bias is None
    torch.testing.assert_close(out, ref_out + ref_bias, rtol=1e-6, atol=1e-6)
