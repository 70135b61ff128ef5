"""The KV cache's layout and row formats.

A layer's keys (and its values) are one tensor [num_blocks, num_kv_heads, block_size, row]: a block holds each KV
head's rows of its tokens together, so a decode task (one sequence's KV head) reads a block's rows as one run of
bytes, which the hardware prefetcher follows and no cache line of which holds another head's row.

float32 / float16 / bfloat16 rows hold the head's D values as they are. An int8 row (`--kv-cache-dtype int8`) holds
them rounded to int8 with one symmetric scale for the row (its largest magnitude / 127), then that float32 scale's
4 bytes: D + 4 bytes against float16's 2 D, what decode attention reads at large batches. The compiled kernels
(write_kv_cache, paged_attention) read and write the same bytes as these PyTorch functions, which serve where
no kernel does (CUDA, caches of a dtype or head size the kernels do not take).
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # an int8 row's float32 scale, after its values


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of `dtype` in a cache row of a head of `head_dim` values."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def head_dim_of(cache: torch.Tensor) -> int:
    """The values a row of `cache` ([..., row]) holds."""
    return cache.shape[-1] - SCALE_BYTES if cache.dtype == torch.int8 else cache.shape[-1]


def encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values [..., D] as cache rows [..., row_width(D)] of `dtype`. int8: each value times 127 / the row's
    largest magnitude, rounded half to even (as the kernel rounds, with the same float32 operations)."""
    if dtype != torch.int8:
        return x.to(dtype)
    x = x.float()
    largest = x.abs().amax(-1, keepdim=True)
    return torch.cat([(x * _inverse_step(largest)).round().to(torch.int8), (largest / 127).view(torch.int8)], -1)


def decode(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., row_width(D)] as values [..., D] of `dtype`."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (rows[..., :-SCALE_BYTES].float() * scale).to(dtype)


def round_queries(q: torch.Tensor) -> torch.Tensor:
    """Queries [..., D] as the decode kernel multiplies them with int8 keys: rounded to int8 a row (head) at a time
    as encode rounds keys, and scaled back."""
    largest = q.abs().amax(-1, keepdim=True)
    return (q * _inverse_step(largest)).round() * (largest / 127)


def _inverse_step(largest: torch.Tensor) -> torch.Tensor:
    """127 / largest, 0 where largest is 0: a division, as the kernels divide (a number divided by a tensor,
    `127 / largest`, is the reciprocal times 127 in PyTorch, another rounding for a quarter of the values)."""
    return torch.where(largest > 0, torch.full_like(largest, 127.0) / largest, 0)


def store(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Write keys or values x [T, num_kv_heads, D] into their slots (block * block_size + offset) of `cache`."""
    block_size = cache.shape[2]
    cache[slots // block_size, :, slots % block_size] = encode(x, cache.dtype)


def gather(cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows of the blocks block_tables [..., blocks] lists, in order, as values [..., num_kv_heads, blocks *
    block_size, D] of `dtype`."""
    rows = cache[block_tables].transpose(-4, -3)  # [..., heads, blocks, block_size, row]
    return decode(rows.flatten(-3, -2), dtype)
