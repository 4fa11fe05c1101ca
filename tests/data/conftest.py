"""Fixtures of the data tests (the real images are in tests/conftest.py)."""

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from megatron_moca.data.tokenizer import QwenTokenizer

    return QwenTokenizer()
