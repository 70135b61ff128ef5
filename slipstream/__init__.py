"""slipstream: an OpenAI-compatible LLM inference server on PyTorch."""

import os

# OpenMP worker threads spin before they sleep; GNU OpenMP's default (300000 spins) has them spin against
# any process that shares the cores, and a step then waits for threads that were descheduled: beside two
# CPU-bound neighbours on 2 cores a request took 4.5-4.8x its idle time, with 100000 spins 2.4x (a fair
# share is 2x; benchmarks/busy_neighbour.py). Fewer spins cost idle throughput at batch 16 (20000: -10 to
# -15 %; 100000: none measurable). Read when torch loads; a value in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "100000")

from slipstream.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package should not import torch-heavy modules
        from slipstream.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
