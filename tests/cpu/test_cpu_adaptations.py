"""compat.adapt_megatron_to_cpu: megatron-core's CUDA assumptions answered for CPU runs."""

import torch

from megatron_moca import compat


def test_cuda_devices_are_rewritten_to_cpu(megatron_runtime):
    assert compat.cpu_adapted() and not torch.cuda.is_available()
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x and x.to("cuda:0").device.type == "cpu"
    assert x.to(torch.float64).dtype == torch.float64  # other .to() calls untouched
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(None)


def test_rng_tracker_forks_cpu_state_with_megatron_names(megatron_runtime):
    from megatron.core.tensor_parallel import random as mp_random

    compat.manual_seed(123, tp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    assert set(tracker.get_states()) == {mp_random._DATA_PARALLEL_RNG_TRACKER_NAME,
                                         mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                                         mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME}
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    compat.manual_seed(123, tp_rank=0)
    with mp_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # reseeding reproduces it
    compat.manual_seed(123, tp_rank=1)
    with mp_random.get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(4), a)  # another TP rank draws differently (dropout in TP regions)

