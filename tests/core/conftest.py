"""Fixtures of the core tests (helpers live in ``core_testing``)."""

from __future__ import annotations

import pytest

import adapt_runtime as ar


@pytest.fixture(scope="session")
def bundled():
    model, tokenizer = ar.load_model("llama")
    return model, tokenizer
