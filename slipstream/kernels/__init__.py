"""Compiled CPU kernels: per-ISA builds of the C++ sources here, chosen and self-checked once at load
(dispatch.py); everything else (CUDA included) keeps the plain PyTorch path, so a missing compiler or an
unknown CPU costs speed, never correctness."""

from slipstream.kernels.dispatch import (
    FIVE_BIT_TYPES,
    GGUF_KERNEL_TYPES,
    HALF_DTYPES,
    HALF_TYPES,
    HIGH_BIT_TYPES,
    Q4_TYPES,
    KernelTable,
    kernels,
)

__all__ = [
    "FIVE_BIT_TYPES",
    "GGUF_KERNEL_TYPES",
    "HALF_DTYPES",
    "HALF_TYPES",
    "Q4_TYPES",
    "HIGH_BIT_TYPES",
    "KernelTable",
    "kernels",
]
