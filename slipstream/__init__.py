"""slipstream: an OpenAI-compatible LLM inference server on PyTorch."""

from slipstream.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package should not import torch-heavy modules
        from slipstream.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
