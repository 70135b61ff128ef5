"""Shared fixtures. Models load once per session: the suite must stay fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llm_fp32():
    """The embedded default model (SmolLM2-135M-Instruct), float32, offline API."""
    from slipstream import LLM

    return LLM(kv_cache_memory=512 << 20)


@pytest.fixture(scope="session")
def safetensors_model(tmp_path_factory) -> Path:
    """The embedded model as a plain float32 safetensors checkpoint: its converted directory without the GGUF
    extras."""
    from slipstream.model.loader import GGUF_BLOCKS_FILE, GGUF_TYPES_FILE, hf_directory

    source = hf_directory(None)
    directory = tmp_path_factory.mktemp("smollm2-safetensors")
    for f in source.iterdir():
        if f.name not in (GGUF_BLOCKS_FILE, GGUF_TYPES_FILE, "complete"):
            (directory / f.name).symlink_to(f)
    return directory
