"""Each compiled kernel against its PyTorch reference on a small random input, once per process (milliseconds):
`self_check(ops)` returns the kernels that disagree, and why. The tests (tests/test_kernels.py) hold the same
kernels to the same references over many more shapes.

$SLIPSTREAM_SELFCHECK_BREAK (comma-separated kernel names) is a test hook: those kernels' outputs are perturbed
before the comparison, as a kernel miscompiled for an unknown CPU would be."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from slipstream.kernels.dispatch import (
    FIVE_BIT_TYPES,
    GGUF_KERNEL_TYPES,
    HALF_DTYPES,
    HALF_TYPES,
    HIGH_BIT_TYPES,
    KV_CACHE_KERNEL_DTYPES,
    Q4_TYPES,
)
from slipstream.model import kv_cache
from slipstream.model.layers import (
    high_bit_rows,
    interleave_byte_rows,
    interleave_high_bit_rows,
    interleave_q4_rows,
    split_gguf_blocks,
)

BREAK_ENV = "SLIPSTREAM_SELFCHECK_BREAK"


def q8_reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """What gguf_linear_q8 computes, in PyTorch: x rounded to int8 per 32-value block (scale = max|x| / 127)
    times the dequantized weights (their mins and offsets meet the rounded x too)."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    rounded = (torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0) * d).flatten(1)
    return rounded @ dense.T


# K-quant super-blocks (256 weights): their bytes, and where their fp16 scale fields (d, dmin) sit.
_K_BLOCKS = {12: (144, (0, 2)), 13: (176, (0, 2)), 14: (210, (208,))}


def random_gguf_weight(qtype: int, out_features: int, in_features: int, seed: int):
    """Blocks of a random weight, and their float32 values as the gguf package dequantizes them. The classic
    types are quantized by the gguf package; K-quants (which it cannot quantize) are random bytes with valid
    fp16 scales (in_features a multiple of 256). F16 / BF16: a random weight rounded to it, as bytes."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    if qtype in HALF_TYPES:
        weight = torch.from_numpy(rng.standard_normal((out_features, in_features), dtype=np.float32))
        half = weight.to(HALF_DTYPES[qtype])
        return half.view(torch.uint8).view(out_features, -1), half.float()
    if qtype in _K_BLOCKS:
        size, scale_offsets = _K_BLOCKS[qtype]
        raw = rng.integers(0, 256, (out_features, in_features // 256, size), dtype=np.uint8)
        for offset in scale_offsets:
            d = rng.uniform(5e-4, 2e-3, (out_features, in_features // 256)).astype(np.float16)
            raw[..., offset : offset + 2] = d.view(np.uint8).reshape(out_features, -1, 2)
        blocks = raw.reshape(out_features, -1)
    else:
        weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
        blocks = quants.quantize(weight, GGMLQuantizationType(qtype))
    dense = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType(qtype)).copy())
    return torch.from_numpy(blocks), dense


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-4) -> str | None:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        return f"max error {(got - want).abs().max().item():.3g}"
    return None


def _row_layouts(ops, blocks: torch.Tensor, qtype: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The layouts gguf_linear and gguf_dequantize take blocks of `qtype` in with this build: as split, and the 5-bit
    types at 5 bits a weight where it takes them so."""
    split = split_gguf_blocks(blocks, qtype)
    return [split, high_bit_rows(split, qtype)] if qtype in FIVE_BIT_TYPES and ops.takes_high_bit_rows() else [split]


def _gguf_linear(ops, perturb: Callable) -> str | None:
    # 3 rows and 18: a few activation rows and a batch (multiplied by tiles of expanded weights on AVX2)
    xs = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) for rows in (3, 18)]
    for qtype, name in {**GGUF_KERNEL_TYPES, **HALF_TYPES}.items():
        blocks, dense = random_gguf_weight(qtype, 19, 512, qtype)
        for layout in _row_layouts(ops, blocks, qtype):
            for x in xs:
                if why := _close(perturb(ops.gguf_linear(x, *layout, qtype)), F.linear(x, dense)):
                    return f"{name}: {why}"
    return None


def _gguf_dequantize(ops, perturb: Callable) -> str | None:
    for qtype, name in {**GGUF_KERNEL_TYPES, **HALF_TYPES}.items():
        blocks, dense = random_gguf_weight(qtype, 19, 512, qtype)
        for layout in _row_layouts(ops, blocks, qtype):
            if not torch.equal(perturb(ops.gguf_dequantize(*layout, qtype)), dense):
                return f"{name}: not the gguf package's values"
    return None


def _gguf_linear_q8(ops, perturb: Callable) -> str | None:
    # 5 rows and 18: a few activation rows and a batch (the AMX build's int8 tiles take 12 or more)
    xs = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) for rows in (5, 18)]
    for qtype, name in GGUF_KERNEL_TYPES.items():
        blocks, dense = random_gguf_weight(qtype, 48, 512, qtype)
        split = split_gguf_blocks(blocks, qtype)
        groups = sorted({8, ops.q4_group_rows()})
        layouts = [split] + [interleave_q4_rows(*split, group) for group in groups if qtype in Q4_TYPES]
        if name == "Q8_0":
            layouts.append(interleave_byte_rows(*split, ops.q8_group_rows()))
        if qtype in HIGH_BIT_TYPES:
            layouts += [interleave_high_bit_rows(split, qtype, group) for group in groups]
        for x in xs:
            want = q8_reference(x, dense)
            for layout in layouts:
                if why := _close(perturb(ops.gguf_linear_q8(x, *layout, qtype)), want):
                    return f"{name}: {why}"
    return None


def _paged_attention(ops, perturb: Callable) -> str | None:
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, block_size = 4, 2, 64, 4
    for dtype in KV_CACHE_KERNEL_DTYPES:
        k_cache = kv_cache.encode(torch.randn(8, kv_heads, block_size, dim, generator=g), dtype)
        v_cache = kv_cache.encode(torch.randn(8, kv_heads, block_size, dim, generator=g), dtype)
        own = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(3)])
        chunk = torch.arange(3, 13)  # a prompt chunk's rows, one tile (on AMX a float32 cache's on the matrix tiles)
        # a table a row; one table, a stride-0 view; a chunk's
        for lens, tables in ((torch.tensor([1, 5, 12]), own), (torch.tensor([1, 5, 12]), own[:1].expand(3, -1)),
                             (chunk, own[:1].expand(len(chunk), -1))):
            q = torch.randn(len(lens), heads, dim, generator=g)
            queries = kv_cache.round_queries(q) if dtype == torch.int8 else q  # (int8 keys: q . k in integers)
            got = perturb(ops.paged_attention(q, k_cache, v_cache, tables, lens, dim**-0.5))
            for i, n in enumerate(lens.tolist()):
                k = kv_cache.gather(k_cache, tables[i], torch.float32)[:, :n]
                v = kv_cache.gather(v_cache, tables[i], torch.float32)[:, :n]
                want = F.scaled_dot_product_attention(queries[i].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
                if why := _close(got[i], want, atol=1e-5):
                    return f"{dtype}: {why}"
    return None


def _write_kv_cache(ops, perturb: Callable) -> str | None:
    k, v = torch.randn(3, 2, 16) * 1000, torch.randn(3, 2, 16) * 1000
    k[1, 0] = 0  # (an int8 row of zeros: no scale to divide by)
    for dtype in KV_CACHE_KERNEL_DTYPES:
        row = kv_cache.row_width(16, dtype)
        k_cache, v_cache = (torch.zeros(4, 2, 4, row, dtype=dtype) for _ in range(2))
        want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        slots = torch.tensor([5, 0, 14])
        ops.write_kv_cache(k, v, k_cache, v_cache, slots)
        kv_cache.store(want_k, slots, k)
        kv_cache.store(want_v, slots, v)
        if not torch.equal(perturb(k_cache.float()).to(dtype), want_k) or not torch.equal(v_cache, want_v):
            return f"{dtype}: the slots do not hold the keys and values"
    return None


def _norms(weight: torch.Tensor):
    return lambda t: weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5))


def _rms_norm(ops, perturb: Callable) -> str | None:
    x, weight = torch.randn(3, 45), torch.randn(45)
    return _close(perturb(ops.rms_norm(x, weight, 1e-5)), _norms(weight)(x), atol=1e-5)


def _add_rms_norm_(ops, perturb: Callable) -> str | None:
    x, residual, weight = torch.randn(3, 45), torch.randn(3, 45), torch.randn(45)
    summed = x + residual
    got = perturb(ops.add_rms_norm_(x, residual, weight, 1e-5))
    return _close(got, _norms(weight)(summed), atol=1e-5) or _close(residual, summed, atol=1e-6)


def _silu_and_mul(ops, perturb: Callable) -> str | None:
    gate_up = torch.randn(3, 90) * 10
    gate, up = gate_up.chunk(2, dim=-1)
    return _close(perturb(ops.silu_and_mul(gate_up)), F.silu(gate) * up, atol=1e-5)


def _rotary_(ops, perturb: Callable) -> str | None:
    tokens, heads, kv_heads, dim = 3, 2, 1, 16
    angles = torch.outer(torch.arange(8.0), torch.rand(dim // 2))
    positions = torch.tensor([0, 3, 7])
    c, s = angles.cos()[positions].unsqueeze(1), angles.sin()[positions].unsqueeze(1)
    for interleaved in (False, True):
        q, k = torch.randn(tokens, heads, dim), torch.randn(tokens, kv_heads, dim)
        if interleaved:
            x1, x2 = q[..., 0::2], q[..., 1::2]
            want = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        else:
            x1, x2 = q.chunk(2, dim=-1)
            want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        ops.rotary_(q, k, positions, angles.cos(), angles.sin(), interleaved)
        if why := _close(perturb(q), want, atol=1e-5):
            return f"interleaved={interleaved}: {why}"
    return None


def _argmax_rows(ops, perturb: Callable) -> str | None:
    x = torch.randn(4, 45)
    x[1, 40] = x[1, 7] = x[1].max() + 1  # a repeated maximum: the first is the answer
    x[2, 9] = float("nan")  # NaN counts as the largest
    got, want = ops.argmax_rows(x), x.argmax(dim=-1)
    return None if torch.equal(perturb(got), want) else f"{got.tolist()} != {want.tolist()}"


CHECKS: dict[str, Callable] = {
    "gguf_linear": _gguf_linear, "gguf_dequantize": _gguf_dequantize, "gguf_linear_q8": _gguf_linear_q8,
    "paged_attention": _paged_attention,
    "write_kv_cache": _write_kv_cache,
    "rms_norm": _rms_norm, "add_rms_norm_": _add_rms_norm_, "silu_and_mul": _silu_and_mul, "rotary_": _rotary_,
    "argmax_rows": _argmax_rows,
}


def self_check(ops) -> dict[str, str]:
    """The kernels of `ops` that disagree with PyTorch (or fail), with why."""
    broken = set(filter(None, os.environ.get(BREAK_ENV, "").split(",")))
    failed: dict[str, str] = {}
    with torch.random.fork_rng(), torch.inference_mode():  # the engine's seeded generator is left alone
        torch.manual_seed(0)
        for name, check in CHECKS.items():
            perturb = (lambda t: t + 1.0) if name in broken else (lambda t: t)
            try:
                why = check(ops, perturb)
            except Exception as e:  # a kernel that raises on a valid input is as unusable as a wrong one
                why = f"{type(e).__name__}: {e}"
            if why is not None:
                failed[name] = why
    return failed
