"""Which kernel serves each op on this machine: decided here, once, and nowhere else.

As ggml scores its CPU variants at load, slipstream keeps one table of kernel builds (VARIANTS, best first),
each naming the CPU features it needs and the compiler flags it is built with. The first call of `kernels()`
picks the best variant this CPU runs (or a lower one that $SLIPSTREAM_CPU_ISA names: `avx2`, `none`, ...),
builds it once (torch's cpp_extension, cached per machine), checks each of its kernels against the PyTorch
reference on a small random input (selfcheck.py). A variant with a kernel that disagrees is passed over, with a
warning naming the kernel, for the next lower one; in the last, such a kernel is disabled: a CPU never tested on
degrades to correct-and-slower, never to wrong.

Model code asks the resulting KernelTable what serves a matmul (`gguf_matmul`; beyond it, `gguf_dequantize`
expands the blocks for one call and `dense_linear` multiplies them), an elementwise op (`elementwise`), paged
attention (`attention`) or all layers of a step (`layer_stack_usable`); the model runner asks `serves_gguf_blocks`
before it loads block weights and `serves_half_weights` for what `--dtype bfloat16` means here. Adding an ISA or a
weight type touches this module and its kernels only.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.model.kv_cache import head_dim_of

logger = logging.getLogger(__name__)

ISA_ENV = "SLIPSTREAM_CPU_ISA"

# GGML type ids the block kernels understand (gguf.GGMLQuantizationType values), both gguf_linear (float32
# activations) and gguf_linear_q8 (int8 activations, w4a8).
GGUF_KERNEL_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
GGUF_TYPE_IDS = {name: qtype for qtype, name in GGUF_KERNEL_TYPES.items()}
# Nibble types, which gguf_linear_q8 also takes interleaved by 8 or 16 rows (`interleave_q4_rows`), and the 5- and 6-bit
# types (Q5_0, Q5_1, Q5_K, Q6_K), which it takes so with planes of their high bits (`interleave_high_bit_rows`).
Q4_TYPES = frozenset({2, 3, 12})
HIGH_BIT_TYPES = frozenset({6, 7, 13, 14})
# The 5-bit ones, which gguf_linear (float32 activations) takes at 5 bits a weight too on AVX-512 (`high_bit_rows`).
FIVE_BIT_TYPES = frozenset({6, 7, 13})
# Half-precision rows, which gguf_linear takes too (float32 activations): a bf16 / fp16 checkpoint's own weights,
# exact in float32, at half float32's bytes.
HALF_TYPES = {1: "F16", 30: "BF16"}
HALF_DTYPES = {30: torch.bfloat16, 1: torch.float16}  # their torch dtypes; bfloat16 first: any float32's range

# --dtype bfloat16 (weights rounded to bf16, `KernelTable.rounded_half_linear`): where the CPU multiplies bf16 faster
# than float32 (native_bf16_gemm), oneDNN's bf16 GEMM on weights packed for it at load (x rounded to bf16 too, as a bf16
# model computes) overtakes the half kernel from ROUNDED_GEMM_MIN_ROWS rows for a weight of ROUNDED_GEMM_MIN_WEIGHTS
# values or more, from ROUNDED_GEMM_MIN_ROWS_SMALL for any. AMD EPYC Zen 4, 2 cores, packed GEMM (with the casts) / half
# kernel at 8 / 100 rows: gate_up (3072x576) 1.61x / 2.65x, down (576x1536) 1.12x / 2.59x, q/k/v (960x576) 1.08x /
# 2.24x, the 49152x576 LM head 1.61x / 2.42x; o (576x576) 0.63x at 8, 2.0x at 100; 0.3-0.9x at 1-2 rows.
# (Unpacked, through F.linear, the GEMM was 1.2-2.4x slower.)
ROUNDED_GEMM_MIN_ROWS = 8
ROUNDED_GEMM_MIN_ROWS_SMALL = 32
ROUNDED_GEMM_MIN_WEIGHTS = 512 * 1024
# The CPU multiplies bf16 faster than float32 where its bf16 dot product does at least this many times float32 FMAs'
# products a second (native_bf16_gemm); elsewhere the mode's x stays float32 on the float32 kernels at any row count.
BF16_DOT_MIN_GAIN = 1.2
# Where the build multiplies on AMX tiles, it does so for the rounded mode too, x rounded to bf16 (one tile product a
# block where exact mode has three: `gguf_linear_rounded`, from 9 rows; fewer take the exact row kernel): GGUF blocks
# at any rows, BF16 rows (packed for oneDNN too) up to ROUNDED_TILES_MAX_ROWS, faster than oneDNN's packed GEMM there
# (this Xeon, 2 cores, rounded tiles / oneDNN at 12 / 32 / 64 / 128 / 512 rows: gate_up 1.70x / 1.65x / 1.09x / 0.89x
# / 0.75x, down 1.51x / 0.83-1.87x / 1.51x / 1.48x, q/k/v 2.16x / 1.96x / 1.38x / 1.46x, o 2.49x / 2.01x / 1.94x,
# the LM head 1.13x / 2.14x / 0.87x / 0.57x). At 8-11 rows the row kernel in the layer stack beats oneDNN's GEMM
# through the Python layers in a step (bf16 checkpoint, C = 8: ITL p50 21.0 ms in exact mode, 26.0 in this mode
# through oneDNN, `compare-20261206-0622.md`): up to 64 rows, no GEMM.
ROUNDED_TILES_MAX_ROWS = 64

# KV cache rows the attention kernels read and write (model/kv_cache.py).
KV_CACHE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.int8)

# LayerStack runs all of a step's layers with these kernels and one of the two matmuls: it is only as good
# as they are.
LAYER_STACK_PARTS = ("rms_norm", "add_rms_norm_", "rotary_", "silu_and_mul", "write_kv_cache", "paged_attention")


@dataclass(frozen=True)
class CpuVariant:
    name: str
    features: frozenset[str]  # /proc/cpuinfo flags the build's instructions need
    cflags: tuple[str, ...]
    # Up to this many rows, a matmul in exact mode multiplies the GGUF blocks directly (0.56 bytes a weight for Q4):
    # small batches are bound by memory and by expanding the blocks, which the kernel does once for all its rows;
    # beyond, MKL's GEMM on the blocks' values expanded for the call (gguf_dequantize, ~0.25 ns a weight). The AVX2
    # kernel multiplies 8 rows or more as tiles of expanded weights (gguf_linear.cpp's tiled_linear_impl): on 2 cores
    # of AMD EPYC Zen 3, the embedded model's layers 1.1-3x faster than dequantize + MKL at 32-128 rows, even at 256,
    # 0.9x at 512-1024. The AVX-512 kernel does likewise from 16 rows (k-major tiles of 32 weight rows, x broadcast: a
    # GEMM's register tile): on 2 cores of an Intel Xeon without AMX, the embedded model's layers 1.07-1.5x faster
    # than dequantize + oneDNN's GEMM at 64-256 rows (the Q8_0 LM head 1.5-2.7x), 0.92-1.08x at 512. The int8
    # kernel (w4a8) serves every row count.
    block_kernel_max_rows: int = 256
    # F16 / BF16 rows: beyond this many rows, converting the weight to float32 for the dense GEMM (`dense_linear`)
    # pays (AMD EPYC, 2 cores: the AVX2 kernel is faster than even a resident float32 GEMM up to ~128 rows, the
    # conversion costs ~1 ns a weight). The AVX-512 tiles take them to 256 (an Intel Xeon without AMX, 2 cores, BF16
    # rows of the embedded model's shapes against conversion + oneDNN: 1.14-1.65x at 192 rows, 1.05-1.26x at 256,
    # 0.97-1.46x at 384).
    half_kernel_max_rows: int = 128
    # Whether a dense float32 matmul (a prompt's rows, dense checkpoints) takes oneDNN's GEMM rather than F.linear's
    # MKL. Measured on 2 cores of AMD EPYC Zen 4, where MKL runs its AVX2 code and oneDNN its AVX-512 code: oneDNN
    # 1.1-1.5x at 8-1024 rows for the embedded model's shapes; with both held to AVX2, mixed (0.85-1.4x): MKL stays.
    onednn_gemm: bool = False


_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = (*_AVX2, "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_AVX512_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
VARIANTS = (  # best first; AVX2 sources shared, the VNNI builds take vpdpbusd for int8 dot products (vec.h), the
    # AVX-512 builds their own float32 block kernels (gguf_rows_avx512.h), the AMX build bf16 tiles for exact mode's
    # Q4, Q5, Q8_0 and BF16 types at 9 rows or more (gguf_amx.h; the types it serves so: `KernelTable.tile_types`)
    # and int8 tiles for w4a8's 16-row groups at 12 rows or more (gguf_q8_amx.h)
    CpuVariant("amx", frozenset({*_AVX512, "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}),
               (*_AVX512_FLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"), block_kernel_max_rows=64,
               onednn_gemm=True),
    CpuVariant("avx512_vnni", frozenset(_AVX512), _AVX512_FLAGS, half_kernel_max_rows=256, onednn_gemm=True),
    CpuVariant("avx_vnni", frozenset({*_AVX2, "avx_vnni"}), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")),
    CpuVariant("avx2", frozenset(_AVX2), ("-mavx2", "-mfma", "-mf16c")),
)


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def missing_features(variant: CpuVariant, flags: frozenset[str] | None = None) -> list[str]:
    return sorted(variant.features - (cpu_flags() if flags is None else flags))


def choose_variant(flags: frozenset[str] | None = None, forced: str | None = None) -> CpuVariant | None:
    """The best variant these CPU flags run, or the one `forced` ($SLIPSTREAM_CPU_ISA) names if they run it."""
    runnable = [v for v in VARIANTS if not missing_features(v, flags)]
    if forced is None:
        return runnable[0] if runnable else None
    if forced == "none":
        return None
    for v in VARIANTS:
        if v.name == forced:
            if v in runnable:
                return v
            logger.warning("%s=%s: this CPU lacks %s; using %s", ISA_ENV, forced, ", ".join(missing_features(v, flags)),
                           runnable[0].name if runnable else "no compiled kernels")
            return runnable[0] if runnable else None
    names = ", ".join([v.name for v in VARIANTS] + ["none"])
    raise ValueError(f"{ISA_ENV}={forced!r}: use one of {names}")


@functools.cache
def build(variant: CpuVariant, sources: Path | None = None):
    """The compiled module of `variant` (built on first use, then loaded from torch's cache), or None when this
    machine cannot build it (no compiler, no ninja). `sources`: another directory of kernel sources than this
    package's (benchmarks/engine_ab.py's A/B of a kernel change), built under a name of its own."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = f"slipstream_cpu_kernels_{variant.name}"
        if sources is not None:
            name += "_" + hashlib.sha1(str(sources.resolve()).encode()).hexdigest()[:8]
        build_directory = Path(_get_build_directory(name, verbose=False))
        if not (build_directory / f"{name}.so").exists():  # (else the first start is a minute of silence)
            logger.info("compiling the %s CPU kernels: on a first start only, about a minute on 2 cores", variant.name)
        with _one_build_at_a_time(build_directory):
            return load(
                name=name,
                sources=sorted(str(f) for f in (sources or Path(__file__).parent).glob("*.cpp")),
                extra_cflags=["-O3", *variant.cflags, "-fopenmp"],
                extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP from the header: without it, 1 thread
                build_directory=str(build_directory),
                verbose=False,
            )
    except Exception as e:
        logger.warning("CPU kernels (%s) unavailable (%s); using plain PyTorch ops", variant.name, e)
        return None


@contextlib.contextmanager
def _one_build_at_a_time(build_directory: Path):
    """torch's build lock is a bare file: a build killed midway (a server stopped while it compiled) leaves it behind,
    and every later start waited on it forever. An flock around the build, which the system releases when its holder
    dies, tells a live build from a dead one: whoever holds it finds a lock file left there stale, and removes it."""
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory / "slipstream.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # (waits while another process builds)
        stale = build_directory / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


@dataclass
class KernelTable:
    """The kernels this machine runs, and for each op whether one serves it."""

    variant: CpuVariant | None
    ops: object | None  # the compiled module
    disabled: dict[str, str] = field(default_factory=dict)  # kernel -> why (its self-check disagreed)

    @functools.cached_property
    def tile_types(self) -> frozenset[int]:
        """GGML types gguf_linear multiplies on matrix tiles (AMX) at any row count: none unless this build has them
        and the system lets the process use them."""
        return frozenset(self.ops.tile_types()) if self.has("gguf_linear") else frozenset()

    def has(self, name: str) -> bool:
        return self.ops is not None and name not in self.disabled

    def elementwise(self, name: str, x: torch.Tensor) -> Callable | None:
        """The kernel `name` (rms_norm, add_rms_norm_, rotary_, silu_and_mul, argmax_rows) when it can work on
        `x`: float32 on the CPU."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or not self.has(name):
            return None
        return getattr(self.ops, name)

    @staticmethod
    def cache_fits(cache: torch.Tensor) -> bool:
        """Whether the attention kernels take this KV cache: bound, float32 or float16 rows of whole vectors of 8,
        int8 rows of 32 (--kv-cache-dtype may make it differ from the model's dtype)."""
        vector = 32 if cache.dtype == torch.int8 else 8
        return bool(cache.numel()) and cache.dtype in KV_CACHE_KERNEL_DTYPES and head_dim_of(cache) % vector == 0

    def attention(self, name: str, q: torch.Tensor, cache: torch.Tensor) -> Callable | None:
        """The kernel `name` (write_kv_cache, paged_attention) for queries `q` over `cache`."""
        return self.elementwise(name, q) if self.cache_fits(cache) else None

    def gguf_matmul(self, layer: nn.Module, rows: int) -> Callable | None:
        """The block kernel for a matmul of `rows` rows through `layer`, or None: its dense weight serves."""
        if getattr(layer, "gguf_parts", None) is None:
            return None
        if layer.int8_activations:
            return self.ops.gguf_linear_q8 if self.has("gguf_linear_q8") else None
        if not self.has("gguf_linear") or self._rounded_gemm_serves(layer, rows):
            return None
        kernel = self.ops.gguf_linear_rounded if self.rounds_on_tiles(layer) else self.ops.gguf_linear
        qtypes = [qtype for _, qtype in layer.gguf_parts]
        if all(qtype in self.tile_types for qtype in qtypes):
            return kernel  # (matrix tiles: faster than expanding the blocks for a GEMM at any rows)
        variant = self.variant
        limit = variant.half_kernel_max_rows if any(q in HALF_TYPES for q in qtypes) else variant.block_kernel_max_rows
        return kernel if rows <= limit else None

    def uses_onednn_gemm(self) -> bool:
        return self.variant is not None and self.variant.onednn_gemm and torch.backends.mkldnn.is_available()

    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor) -> Callable:
        """What multiplies `x` by a dense `weight` (F.linear's arguments): oneDNN's float32 GEMM where this variant
        measured it faster than MKL's, else F.linear."""
        if self.uses_onednn_gemm() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
            return onednn_linear
        return F.linear

    def rounded_half_linear(self, layer: nn.Module, rows: int) -> Callable | None:
        """For `--dtype bfloat16` (weights rounded to it, kept as BF16 rows, and packed for oneDNN where the CPU
        multiplies bf16 faster than float32: `layer.bf16_packed`, `pack_rounded_bf16`), a matmul of as many rows as
        oneDNN's bf16 GEMM does faster than the half kernel (ROUNDED_GEMM_MIN_ROWS): x rounded to bf16 too, as a bf16
        model computes. The call takes (packed, x, bias). None elsewhere (exact mode included)."""
        return packed_bf16_linear if self._rounded_gemm_serves(layer, rows) else None

    def _rounded_gemm_serves(self, layer: nn.Module, rows: int) -> bool:
        packed = getattr(layer, "bf16_packed", None)
        if packed is None or rows < ROUNDED_GEMM_MIN_ROWS:
            return False
        if self.rounds_on_tiles(layer):
            return rows > ROUNDED_TILES_MAX_ROWS
        return packed.numel() >= ROUNDED_GEMM_MIN_WEIGHTS or rows >= ROUNDED_GEMM_MIN_ROWS_SMALL

    def rounds_on_tiles(self, layer: nn.Module) -> bool:
        """Whether `layer`'s block kernel is gguf_linear_rounded: in --dtype bfloat16 (`layer.rounds_to_bf16`) where the
        build has tiles, whose types it then multiplies with x rounded to bf16 (the others' kernels stay exact)."""
        return getattr(layer, "rounds_to_bf16", False) and bool(self.tile_types)

    def gguf_dequantize(self) -> Callable | None:
        """The kernel expanding blocks (row layout) or F16 / BF16 rows to float32 — for what no block kernel
        serves: a matmul of more rows, an embedding lookup —, or None: dequantize_blocks in PyTorch."""
        return self.ops.gguf_dequantize if self.has("gguf_dequantize") else None

    def serves_gguf_blocks(self, device: torch.device, dtype: torch.dtype, num_ranks: int, int8: bool) -> bool:
        """Whether a GGUF model's block weights (or a half-precision checkpoint's own) are worth keeping: the matmul
        kernel they need runs here."""
        kernel = "gguf_linear_q8" if int8 else "gguf_linear"
        return device.type == "cpu" and dtype == torch.float32 and num_ranks == 1 and self.has(kernel)

    def serves_half_weights(self, device: torch.device, dtype: torch.dtype, num_ranks: int) -> bool:
        """Whether `--dtype bfloat16` / `float16` is served here as half-precision weights (rounded at load, kept as
        BF16 / F16 rows) with float32 activations, the type these kernels take — rather than plain PyTorch in that
        dtype, which on a CPU has no compiled kernel at all."""
        return dtype in HALF_DTYPES.values() and self.serves_gguf_blocks(device, torch.float32, num_ranks, False)

    def serves_high_bit_rows(self) -> bool:
        """Whether gguf_linear takes the 5-bit types (FIVE_BIT_TYPES) at their own 5 bits a weight (`high_bit_rows`:
        the AVX-512 builds) rather than a byte a weight."""
        return self.has("gguf_linear") and self.ops.takes_high_bit_rows()

    def exact_block_type(self, qtype: int) -> int:
        """The GGUF type whose blocks gguf_linear multiplies qtype's as (float32 activations): Q5_0's as Q8_0 where it
        takes them a byte a weight (not `serves_high_bit_rows`), else qtype's own. The same weights (d x (q - 16), the
        quant a byte, d the file's fp16): 34 bytes a block where the byte form takes 40, and a Q4_K_M file's q/k/v
        (Q5_0 beside a Q8_0 v) one kernel call, not three. The matmuls of a step on the embedded model's Q4_K_M copy at
        one / two / four rows 1.05x / 1.08x / 1.05x, served at C = 1 1.37-1.42x -> 1.46-1.52x llama-server on that
        file (AMD EPYC Zen 3, 2 threads; benchmarks/results/README.md)."""
        bytes_only = self.has("gguf_linear") and not self.serves_high_bit_rows()
        return GGUF_TYPE_IDS["Q8_0"] if GGUF_KERNEL_TYPES.get(qtype) == "Q5_0" and bytes_only else qtype

    def q4_group_rows(self) -> int:
        """Rows per group of the nibble groups (`interleave_q4_rows`, `interleave_high_bit_rows`) that
        this build's int8 kernel multiplies best: 16 with AVX-512 VNNI (one 64-byte vpdpbusd), else 8."""
        return self.ops.q4_group_rows() if self.has("gguf_linear_q8") else 8

    def q8_group_rows(self) -> int | None:
        """Rows per group of the interleaved Q8_0 rows (`interleave_byte_rows`) that this build's int8 kernel takes:
        16 with AVX-512 VNNI, else 8; None without the kernel (byte rows stay as they are)."""
        return self.ops.q8_group_rows() if self.has("gguf_linear_q8") else None

    def layer_stack_usable(self, int8: bool) -> bool:
        """Whether LayerStack may run a step whose matmuls take int8 activations (w4a8) or float32 ones."""
        parts = (*LAYER_STACK_PARTS, "gguf_linear_q8" if int8 else "gguf_linear")
        return self.has("LayerStack") and all(self.has(k) for k in parts)

    def describe(self) -> str:
        if self.variant is None:
            return "none (plain PyTorch ops)"
        if self.ops is None:
            return f"{self.variant.name}: not built (plain PyTorch ops)"
        off = f"; disabled after their self-check: {', '.join(sorted(self.disabled))}" if self.disabled else ""
        gemm = "oneDNN" if self.uses_onednn_gemm() else "MKL"
        bf16 = ", --dtype bfloat16 from 8 rows: oneDNN bf16 GEMM on packed weights" if native_bf16_gemm() else ""
        if not bf16 and bf16_dot_gain():
            bf16 = f", --dtype bfloat16 on the float32 kernels (bf16 dot products {bf16_dot_gain():.2f}x FMAs' here)"
        if bf16 and self.tile_types:
            bf16 += f" (up to {ROUNDED_TILES_MAX_ROWS} rows, and GGUF blocks at any: x rounded on AMX tiles from 9)"
        tiles = "/".join({**GGUF_KERNEL_TYPES, **HALF_TYPES}[t] for t in sorted(self.tile_types))
        tiles = f", {tiles} at any rows on AMX tiles (w4a8's groups from 12 rows on int8 tiles)" if tiles else ""
        return f"{self.variant.name} (gguf blocks {'/'.join(GGUF_KERNEL_TYPES.values())} up to " \
               f"{self.variant.block_kernel_max_rows} rows{tiles}, F16/BF16 rows, paged attention (float32 / float16 " \
               f"/ int8 caches), norm/rotary/SwiGLU, layer stack; dense float32 GEMM: {gemm}{bf16}){off}"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN (float32 accumulation: the same products, in another order)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 faster than float32, so that oneDNN's bf16 GEMM beats the float32 kernels:
    with AMX, or with AVX512-BF16 whose dot product does more products a second than float32 FMAs (the build's probe,
    cpu_probe.cpp: AMD Zen 4 yes; an Intel Xeon without AMX half as many)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return "amx_bf16" in cpu_flags() or bf16_dot_gain() >= BF16_DOT_MIN_GAIN


@functools.cache
def bf16_dot_gain() -> float:
    """Products a second of this core's bf16 dot product over float32 FMAs' (measured once; 0: it has none)."""
    ops = kernels().ops
    return ops.bf16_dot_gain() if ops is not None else 0.0


def pack_rounded_bf16(rows: torch.Tensor) -> torch.Tensor | None:
    """BF16 rows (uint8 [N, 2K]) of a `--dtype bfloat16` matmul packed for oneDNN's bf16 GEMM (`packed_bf16_linear`)
    where the CPU multiplies bf16 faster than float32 (native_bf16_gemm); None elsewhere. A second copy of the
    weight, in oneDNN's layout."""
    if not native_bf16_gemm():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(rows.view(torch.bfloat16), 32)  # (a batch hint; any serves)


def packed_bf16_linear(packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T for W packed by pack_rounded_bf16, x rounded to bf16, float32 sums, float32 out."""
    y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "").float()
    return y if bias is None else y + bias


_table: KernelTable | None = None
_deciding = threading.Lock()


def kernels() -> KernelTable:
    """This machine's kernel table, decided (built and self-checked) on the first call in a process."""
    global _table
    if _table is None:  # (model code asks on every op: no lock once decided)
        with _deciding:
            if _table is None:
                _table = _decide()
    return _table


def decided() -> KernelTable | None:
    """The kernel table if this process has decided it already (never builds anything)."""
    return _table


def _decide() -> KernelTable:
    """The chosen variant if all its kernels pass their self-check; else the next lower variant that passes (a
    variant is only as trusted as its checks); else the lowest one built, without the kernels that failed."""
    from slipstream.kernels.selfcheck import self_check

    chosen = choose_variant(forced=os.environ.get(ISA_ENV) or None)
    if chosen is None:
        return KernelTable(None, None)
    table = KernelTable(chosen, None)
    for variant in [v for v in VARIANTS[VARIANTS.index(chosen):] if not missing_features(v)]:
        ops = build(variant)
        if ops is None:
            continue
        table = KernelTable(variant, ops, self_check(ops))
        if not table.disabled:
            return table
        for name, why in table.disabled.items():
            logger.warning("CPU kernel %s (%s) disagrees with PyTorch on its self-check (%s): disabled", name,
                           variant.name, why)
    if table.disabled:
        logger.warning("CPU kernels %s: %s run in plain PyTorch", table.variant.name, ", ".join(sorted(table.disabled)))
    return table
