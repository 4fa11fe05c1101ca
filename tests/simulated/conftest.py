"""The simulated GPU-path tier: the project's wiring around GPU-only libraries (Transformer Engine, ...) run on
the CPU against stand-ins of their documented contracts (megatron_moca/standins/), never instead of the
real library where it is installed (TE here by default; DALI's GPU pipeline where a test asks for it).

Collectives run on gloo, which is laxer than NCCL: a collective whose shapes differ between ranks can
return on one of them, where NCCL hangs or reads past a buffer. Here every process group runs under
torch's collective checker (TORCH_DISTRIBUTED_DEBUG=DETAIL: before each collective the ranks compare its
op, sequence number, shapes, dtypes and devices, and a mismatch is an error on every rank), so a multi-rank
run of this tier holds NCCL's rule that all ranks issue the same collectives in the same order with the same
shapes. (NCCL's other rule, tensors on the rank's GPU, cannot be shown on a CPU: tools/cluster_check.sh.)"""

import pytest


@pytest.fixture(autouse=True)
def simulated_environment(monkeypatch):
    monkeypatch.setenv("MOCA_STANDINS", "te")
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")  # read by child processes (torchrun, mp.spawn)
