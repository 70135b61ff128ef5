"""Which model class builds a checkpoint: config.json's `architectures[0]` -> builder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slipstream.model import llama

# (hf_config, dtype, device, max_positions) -> model with forward/logits/attention_layers/load_weights
ModelBuilder = Callable[[object, torch.dtype, torch.device, int], nn.Module]
MODEL_REGISTRY: dict[str, ModelBuilder] = dict.fromkeys(llama.ARCHITECTURES, llama.build_model)


def architecture(hf_config) -> str:
    return (getattr(hf_config, "architectures", None) or ["<none>"])[0]


def check_supported(hf_config) -> None:
    arch = architecture(hf_config)
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}")


def build_model(hf_config, dtype: torch.dtype, device: torch.device, max_positions: int) -> nn.Module:
    check_supported(hf_config)
    return MODEL_REGISTRY[architecture(hf_config)](hf_config, dtype, device, max_positions)
