"""megatron-core parallel linears that hand their bias to the GEMM, as nn.Linear does.

megatron-core's linears (tensor_parallel/layers.py) compute `matmul(x, W.t())` and add the bias in a
second pass over the output (column-parallel inside `LinearWithGradAccumulationAndAsyncCommunication`,
row-parallel after the all-reduce), and megatron's MLP asks for both biases back separately
(skip_bias_add): fc1's for its fused bias+SwiGLU kernel where that is on (bias_activation_fusion, CUDA:
models/transformer_configs.fuse_activations), fc2's to be added later by the caller. `F.linear` gives
the bias to the GEMM (addmm: cuBLASLt's bias epilogue on CUDA): one pass less per linear, and the bias
added before the single rounding to bf16, as in HF's nn.Linear. Only the plain case takes this path:
whatever megatron's own path implements beyond it (sequence parallel, gradient-accumulation fusion into
main_grad, deferred weight gradients, GTP weight sharding, frozen weights, a row-parallel all-reduce,
or an argument this version does not know) keeps megatron's path, and fc1's bias stays with the fused
SwiGLU where that is on. The backward is autograd's addmm backward (the same products and
bias-gradient sum); column-parallel with TP > 1 all-reduces the input gradient through
copy_to_tensor_model_parallel_region, as megatron's allreduce_dgrad does.
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
    def __init__(self, *args, **kwargs):
        # At TP=1 megatron still routes the input through copy_to_tensor_model_parallel_region, an
        # identity autograd Function (a Python forward and backward per call, host time on a
        # launch-bound ViT step); its disable_grad_reduce flag skips it and means nothing else at TP=1.
        if kwargs["config"].tensor_model_parallel_size == 1:
            kwargs["disable_grad_reduce"] = True
        super().__init__(*args, **kwargs)

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


class MLPFc1BiasInGemm(BiasInGemmColumnParallelLinear):
    """linear_fc1 for megatron's MLP, which builds it with skip_bias_add=True to fuse the bias with the
    activation: kept so when that fusion is on (config.bias_activation_fusion), otherwise the bias goes
    into the GEMM and None is returned (MLP.forward then adds nothing)."""

    def __init__(self, *args, skip_bias_add=False, **kwargs):
        skip_bias_add = skip_bias_add and kwargs["config"].bias_activation_fusion
        super().__init__(*args, skip_bias_add=skip_bias_add, **kwargs)


class MLPFc2BiasInGemm(BiasInGemmRowParallelLinear):
    """linear_fc2 for megatron's MLP (built with skip_bias_add=True): the bias goes into the GEMM and None
    is returned, which the layers around the MLP treat as no bias."""

    def __init__(self, *args, skip_bias_add=False, **kwargs):
        super().__init__(*args, skip_bias_add=False, **kwargs)
