"""megatron-core parallel linears that hand their bias to the GEMM, as nn.Linear does.

megatron-core's linears (tensor_parallel/layers.py) compute `matmul(x, W.t())` and add the bias in a
second pass over the output (column-parallel inside `LinearWithGradAccumulationAndAsyncCommunication`,
row-parallel after the all-reduce); megatron's MLP even asks for the bias back separately
(skip_bias_add) to fuse it with the activation, a fusion the local spec does not use. `F.linear` gives
the bias to the GEMM (addmm: cuBLASLt's bias epilogue on CUDA): one pass less per linear, and the bias
added before the single rounding to bf16, as in HF's nn.Linear. Only the plain case takes this path:
whatever megatron's own path implements beyond it (sequence parallel, gradient-accumulation fusion into
main_grad, deferred weight gradients, GTP weight sharding, frozen weights, a row-parallel all-reduce,
or an argument this version does not know) keeps megatron's path. The backward is autograd's addmm
backward (the same products and bias-gradient sum); column-parallel with TP > 1 all-reduces the input
gradient through copy_to_tensor_model_parallel_region, as megatron's allreduce_dgrad does.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region)

# keyword arguments of megatron's _forward_impl and the values for which it is a plain linear
_PLAIN = {"gradient_accumulation_fusion": (False,), "sequence_parallel": (False,), "grad_output_buffer": (None,),
          "gtp_remat_size": (None, 1), "wgrad_deferral_limit": (None, 0), "async_grad_allreduce": (None, False)}
_ANY = {"allreduce_dgrad", "tp_group"}


class BiasInGemmColumnParallelLinear(ColumnParallelLinear):
    def _forward_impl(self, input, weight, bias=None, **kwargs):
        plain = bias is not None and weight.requires_grad and all(
            name in _ANY or value in _PLAIN.get(name, ()) for name, value in kwargs.items())
        if not plain:
            return super()._forward_impl(input=input, weight=weight, bias=bias, **kwargs)
        if kwargs.get("allreduce_dgrad"):
            input = copy_to_tensor_model_parallel_region(input, group=kwargs.get("tp_group"))
        return F.linear(input, weight, bias)


class BiasInGemmRowParallelLinear(RowParallelLinear):
    def forward(self, input_):
        plain = (self.bias is not None and not self.skip_bias_add and self.input_size_per_partition == self.input_size
                 and not (self.sequence_parallel or self.explicit_expert_comm or self.gradient_accumulation_fusion)
                 and self.weight.requires_grad and getattr(self, "gtp_remat_size", 1) in (None, 1))
        if not plain:  # TP > 1: the bias must come after the all-reduce
            return super().forward(input_)
        return F.linear(input_, self.weight, self.bias), None


def _bias_inside(skip_bias_add: bool, config) -> bool:
    """skip_bias_add as built for megatron's MLP: off (bias added by the linear, None returned, which
    MLP.forward and the layers around it treat as no bias) unless MLP fuses bias and activation."""
    return skip_bias_add if getattr(config, "bias_activation_fusion", False) else False


class MLPFc1BiasInGemm(BiasInGemmColumnParallelLinear):
    """linear_fc1 for megatron's MLP (which builds it with skip_bias_add=True)."""

    def __init__(self, *args, skip_bias_add=False, **kwargs):
        super().__init__(*args, skip_bias_add=_bias_inside(skip_bias_add, kwargs["config"]), **kwargs)


class MLPFc2BiasInGemm(BiasInGemmRowParallelLinear):
    """linear_fc2 for megatron's MLP (which builds it with skip_bias_add=True)."""

    def __init__(self, *args, skip_bias_add=False, **kwargs):
        super().__init__(*args, skip_bias_add=_bias_inside(skip_bias_add, kwargs["config"]), **kwargs)
