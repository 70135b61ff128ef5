"""Shared fixtures. Models load once per session: the suite must stay fast on 2 cores."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config) -> None:
    """Converted GGUFs (the embedded model, the files tests write) go to a cache of this run, removed at its end:
    each test file's GGUF is new, and would otherwise stay in the user's cache. Servers the tests start inherit it."""
    if "SLIPSTREAM_CACHE" not in os.environ:
        os.environ["SLIPSTREAM_CACHE"] = config._slipstream_cache = tempfile.mkdtemp(prefix="slipstream-test-cache-")


def pytest_unconfigure(config) -> None:
    if cache := getattr(config, "_slipstream_cache", None):
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def llm_fp32():
    """The embedded default model (SmolLM2-135M-Instruct), float32, offline API."""
    from slipstream import LLM

    return LLM(kv_cache_memory=512 << 20)


@pytest.fixture(scope="session")
def safetensors_model(tmp_path_factory) -> Path:
    """The embedded model as a plain float32 safetensors checkpoint: its converted directory's config and
    tokenizer, and every weight dequantized."""
    from safetensors.torch import save_file

    from slipstream.model.loader import GGUF_BLOCKS_FILE, GGUF_TYPES_FILE, hf_directory, iter_weights

    source = hf_directory(None)
    directory = tmp_path_factory.mktemp("smollm2-safetensors")
    for f in source.iterdir():
        if f.name not in (GGUF_BLOCKS_FILE, GGUF_TYPES_FILE, "complete") and f.suffix != ".safetensors":
            (directory / f.name).symlink_to(f)
    save_file(dict(iter_weights(source)), directory / "model.safetensors")
    return directory
