"""Shared fixtures. Models load once per session: the suite must stay fast on 2 cores."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm_fp32():
    """The embedded default model (SmolLM2-135M-Instruct), float32, offline API."""
    from slipstream import LLM

    return LLM(kv_cache_memory=512 << 20)
