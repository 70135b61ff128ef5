"""Compiled CPU kernels, built on first use (torch's cpp_extension + ninja, cached per machine).

Only x86 CPUs with AVX2/FMA/F16C get them; everything else (CUDA included) keeps the plain
PyTorch path, so a missing compiler costs speed, never correctness.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# GGML type ids that gguf_linear understands (gguf.GGMLQuantizationType values).
GGUF_KERNEL_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_ops():
    """The compiled module, or None when this machine cannot build or run it."""
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import load

        here = Path(__file__).parent
        return load(
            name="slipstream_cpu_kernels",
            sources=sorted(str(f) for f in here.glob("*.cpp")),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP from the header: without it, 1 thread
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, ...: fall back to dense weights
        logger.warning("CPU kernels unavailable (%s); using plain PyTorch ops", e)
        return None
