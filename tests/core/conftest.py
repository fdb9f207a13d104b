"""Fixtures of the core tests (helpers live in ``core_testing``)."""

from __future__ import annotations

import pytest
import torch
from core_testing import DEVICE

import adapt_runtime as ar


@pytest.fixture(autouse=True)
def _test_device() -> None:
    """Skip, with the reason, when ``ADAPT_TEST_DEVICE`` names a device this machine does not have."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"ADAPT_TEST_DEVICE={DEVICE} but CUDA is not available")


@pytest.fixture(scope="session")
def bundled():
    model, tokenizer = ar.load_model("llama", device=str(DEVICE))
    return model, tokenizer
