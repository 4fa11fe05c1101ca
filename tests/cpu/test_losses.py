"""token_cross_entropy equals megatron-core's vocab_parallel_cross_entropy (TP=1 here; the TP>1 path is
megatron's own function)."""

import torch

from megatron_moca.objectives.losses import token_cross_entropy
from megatron_moca.objectives.masking import IGNORE_INDEX


def test_matches_megatron_vocab_parallel_cross_entropy(megatron_runtime):
    from megatron.core import tensor_parallel

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 2, 1000, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (7, 2), generator=g)
    labels[3, 1] = IGNORE_INDEX
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = token_cross_entropy(a, labels)
    ref = tensor_parallel.vocab_parallel_cross_entropy(b.float(), labels.clamp(min=0))
    assert ours.shape == labels.shape and ours.dtype == torch.float32
    assert ours[3, 1] == 0
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-6, atol=1e-5)
    weights = torch.randn(7, 2, generator=g) * keep
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-3)  # bf16 gradients
    assert a.grad.float().abs().sum() > 0 and b.grad[3, 1].abs().sum() == 0 == a.grad[3, 1].abs().sum()


def test_cuda_loss_arithmetic_equals_torch_cross_entropy(megatron_runtime):
    """The loss the TP=1 path runs on CUDA (saved log-sum-exp, gradient formed once in the backward; here
    its two functions eagerly, as inductor compiles them there) equals F.cross_entropy on fp32 logits -
    loss and gradient, fp32 and bf16, ignored labels."""
    from helpers import check_token_cross_entropy

    from megatron_moca.objectives.losses import _TokenCrossEntropy

    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        logits = (4 * torch.randn(13, 1000, generator=g)).to(dtype)
        labels = torch.randint(0, 1000, (13,), generator=g)
        labels[[2, 9]] = IGNORE_INDEX
        check_token_cross_entropy(logits, labels, torch.rand(13, generator=g), 1e-6, tol, tol * 1e-2,
                                  loss_fn=lambda x, y: _TokenCrossEntropy.apply(x, y, False))
