"""The simulated GPU-path tier: the project's wiring around GPU-only libraries (Transformer Engine, ...) run on
the CPU against stand-ins of their documented contracts (megatron_moca/standins/), never instead of the
real library where it is installed (TE here by default; DALI's GPU pipeline where a test asks for it)."""

import pytest


@pytest.fixture(autouse=True)
def te_standin(monkeypatch):
    monkeypatch.setenv("MOCA_STANDINS", "te")
