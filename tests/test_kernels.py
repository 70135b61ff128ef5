"""The compiled CPU kernels against plain PyTorch on the same numbers: every activation-row count
the tiling handles (8/4/2/1 pieces) and output sizes that are not a multiple of the row tile."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
from server_utils import running_server
from torch import nn
from torch.utils.cpp_extension import is_ninja_available

from slipstream import SamplingParams
from slipstream.kernels import (
    FIVE_BIT_TYPES,
    GGUF_KERNEL_TYPES,
    HALF_TYPES,
    HIGH_BIT_TYPES,
    Q4_TYPES,
    dispatch,
    kernels,
)
from slipstream.kernels.selfcheck import BREAK_ENV, q8_reference, random_gguf_weight, self_check
from slipstream.model import kv_cache
from slipstream.model.layers import (
    VocabParallelEmbedding,
    attach_gguf_blocks,
    dequantize_blocks,
    dequantized,
    high_bit_rows,
    interleave_byte_rows,
    interleave_high_bit_rows,
    interleave_q4_rows,
    row_blocks,
    split_gguf_blocks,
)


@pytest.fixture(scope="module", params=[v.name for v in dispatch.VARIANTS])
def ops(request):
    """Each build in the variant table that this CPU can run (the others are skipped, naming what is missing)."""
    variant = next(v for v in dispatch.VARIANTS if v.name == request.param)
    if missing := dispatch.missing_features(variant):
        pytest.skip(f"the {variant.name} kernels need CPU features this machine lacks: {', '.join(missing)}")
    module = dispatch.build(variant)
    if module is None:
        if shutil.which("c++") and is_ninja_available():  # this machine builds them: a failed build is a defect
            pytest.fail(f"the {variant.name} kernels failed to build (the warning above says why)")
        pytest.skip(f"the {variant.name} kernels cannot be built here (no C++ compiler or no ninja)")
    return module


@pytest.mark.parametrize("qtype", sorted({**GGUF_KERNEL_TYPES, **HALF_TYPES}))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 15, 18, 40])  # (tiles: AVX2 from 8 rows, AVX-512 from 16:
# 18 = 12 + 6 rows, 40 = 3 x 12 + 4; 37 weight rows = 32 + 5)
def test_gguf_linear_matches_dequantized_matmul(ops, qtype, rows):
    # 16 blocks of 32 per row (2 super-blocks of 256 for K-quants): whole and partial groups of 8 blocks for
    # the classic types at 320 inputs, K-quants at 512. K-quant blocks are random bytes with valid scales.
    in_features = 512 if GGUF_KERNEL_TYPES.get(qtype, "").endswith("_K") else 320
    blocks, dense = random_gguf_weight(qtype, 37, in_features, seed=qtype * 100 + rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    got = ops.gguf_linear(x, *split_gguf_blocks(blocks, qtype), qtype)
    torch.testing.assert_close(got, F.linear(x, dense), rtol=1e-5, atol=1e-4)  # sums of ~500 terms of ~1


@pytest.mark.parametrize("qtype", [2, 3, 6, 7, 8, 12, 13, 30])
@pytest.mark.parametrize("blocks_a_row", [8, 9, 48])
@pytest.mark.parametrize("rows", [8, 16, 17, 100, 300])
def test_gguf_linear_of_batches_and_prompts(ops, qtype, blocks_a_row, rows):
    """The types the AMX build multiplies on tiles (`tile_types`; the 5-bit ones at 5 bits a weight, as its loader
    gives them; BF16 rows, summed over the whole row before one store) at any row count: 16 activation rows to a tile
    and the rest, in chunks of 128 and the rest (300), 16 weight rows to a tile and the rest (37), blocks in pairs
    and an odd one (9), K = 1536 (down_proj). Float32 accuracy: each activation meets the quants as three bf16
    parts, every product exact. (The AVX2 and AVX-512 builds take such batches as tiles of float32 weights, within
    the same bound.)"""
    in_features = 32 * blocks_a_row * (8 if qtype in (12, 13) else 1)  # (K-quants: super-blocks of 256)
    blocks, dense = random_gguf_weight(qtype, 37, in_features, seed=qtype * 100 + rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)) * 3
    split = split_gguf_blocks(blocks, qtype)
    if qtype in FIVE_BIT_TYPES and ops.takes_high_bit_rows():
        split = high_bit_rows(split, qtype)
    got = ops.gguf_linear(x, *split, qtype)
    want = F.linear(x.double(), dense.double())
    magnitude = F.linear(x.double().abs(), dense.double().abs())  # (a float32 sum's error scales with its terms')
    assert ((got - want).abs() <= 4e-7 * magnitude + 1e-6).all()  # (eps 6e-8 x ~log2(K) roundings)


def kernel_table(ops) -> dispatch.KernelTable:
    """The kernel table of the build `ops` (one of this CPU's variants)."""
    variant = next(v for v in dispatch.VARIANTS if not dispatch.missing_features(v) and dispatch.build(v) is ops)
    return dispatch.KernelTable(variant, ops)


def test_the_tile_types_are_served_at_any_row_count(ops):
    """Where the build multiplies a type on tiles, no row count sends its matmuls to dequantize + a dense GEMM."""
    table = kernel_table(ops)
    layer = nn.Module()
    layer.int8_activations, layer.bf16_packed = False, None
    for qtype in (1, 2, 3, 6, 7, 8, 12, 13, 14, 30):
        layer.gguf_parts = [((), qtype)]
        served = table.gguf_matmul(layer, 4096) is not None
        assert served == (qtype in table.tile_types), (qtype, table.tile_types)
    tiled = frozenset({2, 3, 6, 7, 8, 12, 13, 30})
    assert table.tile_types == (tiled if table.variant.name == "amx" else frozenset())


def test_the_bf16_dot_probe_measures_where_the_cpu_has_the_instruction(ops):
    """cpu_probe.cpp (which dispatch.native_bf16_gemm asks once whether oneDNN's bf16 GEMM may serve --dtype bfloat16):
    a ratio of products a second wherever the CPU has AVX512-BF16 and the build is an AVX-512 one, else 0."""
    gain = ops.bf16_dot_gain()
    print(f"bf16 dot products a second over float32 FMAs': {gain:.2f}")
    if "avx512_bf16" in dispatch.cpu_flags() and "avx512f" in kernel_table(ops).variant.features:
        assert 0.1 < gain < 10
    else:
        assert gain == 0


@pytest.mark.parametrize("qtype", [30, 2, 3, 6, 8, 12, 14])
@pytest.mark.parametrize("rows", [1, 8, 9, 17, 300])
def test_rounded_matmuls_are_x_rounded_to_bf16_times_the_weights(ops, qtype, rows):
    """gguf_linear_rounded (--dtype bfloat16): on AMX tiles, from 9 rows, x rounded to bf16 times the weights (BF16
    rows; GGUF blocks, Q5_0 at 5 bits a weight), float32 sums, one tile product a block; elsewhere (fewer rows, the
    types the tiles do not take, builds without tiles) exact mode's gguf_linear, bitwise."""
    if qtype == 30:
        dense = torch.randn(80, 320, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).float()
        split = (dense.to(torch.bfloat16).view(torch.uint8).view(80, -1), torch.empty(0), torch.empty(0))
    else:
        blocks, dense = random_gguf_weight(qtype, 80, 512, seed=qtype)
        split = split_gguf_blocks(blocks, qtype)
        if qtype in FIVE_BIT_TYPES and ops.takes_high_bit_rows():
            split = high_bit_rows(split, qtype)
    x = torch.randn(rows, dense.shape[1], generator=torch.Generator().manual_seed(rows))
    got, exact = ops.gguf_linear_rounded(x, *split, qtype), ops.gguf_linear(x, *split, qtype)
    if qtype in ops.tile_types() and rows >= 9:
        rounded = x.to(torch.bfloat16).double()
        want, magnitude = F.linear(rounded, dense.double()), F.linear(rounded.abs(), dense.double().abs())
        assert ((got - want).abs() <= 4e-7 * magnitude + 1e-6).all()
        assert (got - exact).abs().max() > 0  # (x was rounded)
    else:
        assert torch.equal(got, exact)


def test_the_rounded_mode_takes_the_tiles_where_they_beat_the_gemm(ops):
    """--dtype bfloat16 where the build has tiles: gguf_linear_rounded for GGUF blocks at any rows, for BF16 rows up
    to 64 (the tiles from 9, the exact row kernel below), oneDNN's packed GEMM beyond; without tiles the GEMM from 8
    rows, the exact kernels below."""
    table = kernel_table(ops)
    tiles = bool(table.tile_types)
    bf16_rows, q4_1 = nn.Module(), nn.Module()
    bf16_rows.gguf_parts = [((), 30)]
    bf16_rows.bf16_packed = torch.empty(3072 * 576)  # (gate_up's size: the GEMM's from 8 rows)
    q4_1.gguf_parts, q4_1.bf16_packed = [((), 3)], None
    for layer in (bf16_rows, q4_1):
        layer.int8_activations, layer.rounds_to_bf16 = False, True
    for rows in (1, 8, 11, 12, 64, 65, 512):
        kernel = table.gguf_matmul(bf16_rows, rows)
        on_tiles = tiles and rows <= 64
        assert (kernel is ops.gguf_linear_rounded) == on_tiles, rows
        assert (kernel is ops.gguf_linear) == (not tiles and rows < 8), rows
        assert (table.rounded_half_linear(bf16_rows, rows) is not None) == (rows >= 8 and not on_tiles), rows
        if tiles:
            assert table.gguf_matmul(q4_1, rows) is ops.gguf_linear_rounded, rows


@pytest.mark.parametrize("qtype", sorted(t for t, name in GGUF_KERNEL_TYPES.items() if not name.endswith("_K")))
@pytest.mark.parametrize("blocks_a_row", range(9, 16))
def test_gguf_linear_takes_every_partial_group_of_blocks(ops, qtype, blocks_a_row):
    """A row's scales go eight blocks at a time, the last 1-7 of them lane by lane (gguf_blocks.h load_halves /
    load_floats): each of those counts, in exact mode and with rounded activations, at one activation row and three."""
    in_features = 32 * blocks_a_row
    blocks, dense = random_gguf_weight(qtype, 19, in_features, seed=qtype * 100 + blocks_a_row)
    split = split_gguf_blocks(blocks, qtype)
    for rows in (1, 3):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(blocks_a_row))
        torch.testing.assert_close(ops.gguf_linear(x, *split, qtype), F.linear(x, dense), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ops.gguf_linear_q8(x, *split, qtype), q8_reference(x, dense), rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("qtype", sorted({**GGUF_KERNEL_TYPES, **HALF_TYPES}))
def test_gguf_dequantize_gives_the_gguf_packages_values(ops, qtype):
    """What serves a matmul of more rows than the block kernels (through MKL) and an embedding lookup (the rows
    looked up): bitwise the values the gguf package dequantizes, the exact mode's weights."""
    in_features = 512 if GGUF_KERNEL_TYPES.get(qtype, "").endswith("_K") else 320
    blocks, dense = random_gguf_weight(qtype, 37, in_features, seed=qtype)
    split = split_gguf_blocks(blocks, qtype)
    assert torch.equal(ops.gguf_dequantize(*split, qtype), dense)
    ids = torch.tensor([5, 0, 36, 5])
    assert torch.equal(ops.gguf_dequantize(*(t[ids] if t.numel() else t for t in split), qtype), dense[ids])


@pytest.mark.parametrize("qtype", sorted(FIVE_BIT_TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 15, 40])
def test_gguf_linear_takes_the_five_bit_types_at_five_bits_a_weight(ops, qtype, rows):
    """Q5_0 / Q5_1 / Q5_K as high_bit_rows lays them out (nibbles and a word of fifth bits, 20 bytes a block where
    the byte form takes 32): the same matmul, and gguf_dequantize the gguf package's values bitwise."""
    if not ops.takes_high_bit_rows():
        pytest.skip("5-bit rows are the AVX-512 builds' (this one takes the byte form)")
    in_features = 512 if GGUF_KERNEL_TYPES[qtype].endswith("_K") else 320
    blocks, dense = random_gguf_weight(qtype, 37, in_features, seed=qtype * 100 + rows)
    split = split_gguf_blocks(blocks, qtype)
    rows_of_five_bits = high_bit_rows(split, qtype)
    assert rows_of_five_bits[0].numel() * 32 == split[0].numel() * 20
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    torch.testing.assert_close(ops.gguf_linear(x, *rows_of_five_bits, qtype), F.linear(x, dense), rtol=1e-5,
                               atol=1e-4)
    assert torch.equal(ops.gguf_dequantize(*rows_of_five_bits, qtype), dense)


@pytest.mark.parametrize("qtype", sorted(FIVE_BIT_TYPES))
def test_five_bit_rows_give_the_gguf_packages_values_to_every_reader(qtype):
    """Where the kernels take the 5-bit types at 5 bits a weight, a layer keeps them so in exact mode; the PyTorch
    fallback and an embedding's lookups read the same values as the gguf package."""
    in_features = 256 if GGUF_KERNEL_TYPES[qtype].endswith("_K") else 128
    blocks, dense = random_gguf_weight(qtype, 64, in_features, seed=qtype)
    assert torch.equal(dequantize_blocks(high_bit_rows(split_gguf_blocks(blocks, qtype), qtype), qtype), dense)
    embedding = VocabParallelEmbedding(64, in_features)
    attach_gguf_blocks(embedding, blocks, qtype, int8_activations=False)
    quants = embedding.gguf_parts[0].split[0]
    assert quants.shape[1] == (in_features // 32 * 20 if kernels().serves_high_bit_rows() else in_features)
    ids = torch.tensor([[0, 5], [33, 63]])
    assert torch.equal(embedding(ids), dense[ids])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("dim", [16, 64, 120, 128])  # pieces of 64, 32, 16 and 8 dimensions
# query heads a KV head: 3 (one pack of 3 heads), 4 (two of 2), 7 (3 + 3 + 1), 1
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (8, 2), (7, 1), (3, 3)])
def test_paged_attention_matches_sdpa(ops, dim, cache_dtype, heads, kv_heads):
    if cache_dtype == torch.int8 and dim % 32:
        pytest.skip("int8 rows: head_dim a multiple of 32 (KernelTable.cache_fits)")
    torch.manual_seed(dim)
    block_size, num_blocks = 4, 16
    k_cache = kv_cache.encode(torch.randn(num_blocks, kv_heads, block_size, dim), cache_dtype)
    v_cache = kv_cache.encode(torch.randn(num_blocks, kv_heads, block_size, dim), cache_dtype)
    assert kernels().cache_fits(k_cache)
    lens = torch.tensor([1, 7, 8, 13, 24, 3, 16, 20, 9])  # partial and whole groups of 8 keys
    tables = torch.stack([torch.randperm(num_blocks)[:6] for _ in lens])
    q = torch.randn(len(lens), heads, dim)
    # int8 keys: the kernel multiplies them with the queries rounded to int8 (a scale a head), in integers
    queries = kv_cache.round_queries(q) if cache_dtype == torch.int8 else q
    threads = torch.get_num_threads()
    # 1 and 2 threads take a KV group's heads in packs (groups enough for them), 5 threads one head a task; 2 and 5
    # threads split the tasks inside a KV group (7 heads to 1), where the kernel's reuse of rows starts
    try:
        for n_threads in (1, 2, 5):
            torch.set_num_threads(n_threads)
            got = ops.paged_attention(q, k_cache, v_cache, tables, lens, dim**-0.5)
            for i, n in enumerate(lens.tolist()):
                k = kv_cache.gather(k_cache, tables[i], torch.float32)[:, :n]  # [Hkv, n, D]
                v = kv_cache.gather(v_cache, tables[i], torch.float32)[:, :n]
                want = F.scaled_dot_product_attention(queries[i].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
                torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
# a prompt's first chunk, one after 150 cached tokens, and one whose rows pass 512 tokens (from there a row attends in
# two spans of tokens and folds their results together: alone, a task a span; in runs of more than 4 rows, in one task)
@pytest.mark.parametrize("start", [0, 150, 500])
def test_a_query_rows_attention_is_the_same_in_any_batch(ops, cache_dtype, start):
    """A prompt chunk's rows attend through one block table (a stride-0 view, lengths start + 1 .. start + n), bitwise
    as each row alone or among other sequences' rows: the kernel's arithmetic for a row does not depend on its batch.
    (The kernel takes such rows in tiles that share each key and value: 37 rows are tiles of 16, 16 and 5, and rows
    past 64 tokens hold their value sums between spans of tokens.) On AMX a float32 cache's (exact mode's) tiles of 8
    rows or more (up to 64 from 1024 tokens) go to the matrix tiles, whose sums are float32's in another order: there a
    row is the same as alone within float32's error, bitwise in any tile of 8 rows or more."""
    torch.manual_seed(7)
    block_size, num_blocks, heads, kv_heads, dim = 4, 160, 9, 3, 64
    k_cache = kv_cache.encode(torch.randn(num_blocks, kv_heads, block_size, dim), cache_dtype)
    v_cache = kv_cache.encode(torch.randn(num_blocks, kv_heads, block_size, dim), cache_dtype)
    n = 37
    table = torch.randperm(num_blocks)[: -(-(start + n) // block_size)]
    q = torch.randn(n, heads, dim)
    lens = torch.arange(start + 1, start + n + 1)
    chunk = ops.paged_attention(q, k_cache, v_cache, table.unsqueeze(0).expand(n, -1), lens, dim**-0.5)
    on_matrix_tiles = cache_dtype == torch.float32 and bool(ops.tile_types())

    def same(got, want):
        if on_matrix_tiles:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
        else:
            assert torch.equal(got, want)

    for i in (0, 5, 15, 16, 17, 36):
        alone = ops.paged_attention(q[i : i + 1], k_cache, v_cache, table.unsqueeze(0), lens[i : i + 1], dim**-0.5)
        same(chunk[i], alone[0])
    # Among 8 decode rows and another chunk's rows, the tables side by side (not one stride-0 view)
    others = torch.stack([torch.randperm(num_blocks)[: table.numel()] for _ in range(9)])
    other_lens = torch.cat([torch.randint(1, start + 40, (8,)), torch.arange(start + 1, start + 21)])
    mixed = ops.paged_attention(torch.cat([torch.randn(28, heads, dim), q[10:30]]), k_cache, v_cache,
                                torch.cat([others[:8], others[8:].expand(20, -1), table.expand(20, -1)]),
                                torch.cat([other_lens, lens[10:30]]), dim**-0.5)
    same(mixed[28:], chunk[10:30])
    if on_matrix_tiles:  # rows 10-25 are a tile of 16 there as in the chunk (tiles of 16 from row 0, then from 16)
        assert torch.equal(mixed[28:44], chunk[10:26])
    k = kv_cache.gather(k_cache, table, torch.float32)[:, : start + n]
    v = kv_cache.gather(v_cache, table, torch.float32)[:, : start + n]
    queries = kv_cache.round_queries(q) if cache_dtype == torch.int8 else q
    causal = torch.arange(start + n) < lens.unsqueeze(1)
    want = F.scaled_dot_product_attention(queries.transpose(0, 1), k, v, attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(chunk, want.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dim", "heads", "kv_heads"), [(64, 9, 3), (128, 8, 2), (32, 4, 4)])
def test_a_prompt_chunks_attention_over_a_long_context_matches_float64(ops, dim, heads, kv_heads):
    """A prompt chunk's rows 1100-1180 tokens into a float32 cache (exact mode's), the keys scaled up so a row's
    greatest score moves from chunk to chunk of the AMX tiles' online softmax (128 tokens a chunk; with more than 64
    dims the query parts go to the tiles in pairs of 32-dim chunks; past 1024 tokens tiles of up to 64 rows): each row
    within float32's error of float64."""
    torch.manual_seed(dim)
    block_size, start, n = 16, 1100, 80
    blocks = -(-(start + n) // block_size)
    k_cache = torch.randn(blocks + 2, kv_heads, block_size, dim) * 3
    v_cache = torch.randn(blocks + 2, kv_heads, block_size, dim)
    table = torch.randperm(blocks + 2)[:blocks]
    q = torch.randn(n, heads, dim)
    lens = torch.arange(start + 1, start + n + 1)
    got = ops.paged_attention(q, k_cache, v_cache, table.unsqueeze(0).expand(n, -1), lens, dim**-0.5)
    k = kv_cache.gather(k_cache, table, torch.float64)[:, : start + n]
    v = kv_cache.gather(v_cache, table, torch.float64)[:, : start + n]
    causal = torch.arange(start + n) < lens.unsqueeze(1)
    want = F.scaled_dot_product_attention(q.double().transpose(0, 1), k, v, attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(got.double(), want.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [64, 45])  # a multiple of the vector width, and one with a tail
def test_norm_and_activation_kernels_match_pytorch(ops, width):
    torch.manual_seed(width)
    x, residual, weight = torch.randn(5, width), torch.randn(5, width), torch.randn(width)

    def rms_norm(t):
        return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5))

    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), rms_norm(x))
    summed = x + residual
    torch.testing.assert_close(ops.add_rms_norm_(x, residual, weight, 1e-5), rms_norm(summed))
    torch.testing.assert_close(residual, summed)  # the residual stream is updated in place
    gate_up = torch.randn(5, 2 * width) * 10  # large inputs exercise exp's range
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("width", [1, 5, 8, 32, 45, 77, 49152])  # under, at and over 32 (4 chains of 8); a vocabulary
def test_argmax_kernel_matches_torch_argmax(ops, width):
    torch.manual_seed(width)
    x = torch.randn(6, width)
    x[1] = float("-inf")  # nothing larger than the first
    x[2, -1] = x[2, width // 2] = x[2].max() + 1  # a repeated maximum: the first wins
    x[3] = x[3].round()  # many ties
    x[4, -1] = float("nan")  # NaN counts as the largest: in the tail, then in the vectors
    x[5, width // 3] = x[5, -1] = float("nan")
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(x[:, : max(1, width - 1)]), x[:, : max(1, width - 1)].argmax(dim=-1))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_kernel_matches_pytorch(ops, interleaved):
    torch.manual_seed(1)
    tokens, heads, kv_heads, dim = 4, 3, 1, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)  # strided views, as the model passes them
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    angles = torch.outer(torch.arange(10.0), torch.rand(dim // 2))
    positions = torch.tensor([0, 3, 7, 9])

    def rotate(t):
        c, s = angles.cos()[positions].unsqueeze(1), angles.sin()[positions].unsqueeze(1)
        if interleaved:
            x1, x2 = t[..., 0::2], t[..., 1::2]
            return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        x1, x2 = t.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    want_q, want_k = rotate(q), rotate(k)
    ops.rotary_(q, k, positions, angles.cos(), angles.sin(), interleaved)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
def test_write_kv_cache_fills_the_given_slots(ops, cache_dtype):
    torch.manual_seed(0)
    # values float16 must round, in rows of many magnitudes (int8: each row its own scale)
    k, v = (torch.randn(48, 2, 32) * 1000 * torch.rand(48, 2, 1) for _ in range(2))
    v[2, 1] = 0  # (an int8 row of zeros has no largest magnitude to scale by)
    row = kv_cache.row_width(32, cache_dtype)
    k_cache, v_cache = (torch.zeros(16, 2, 4, row, dtype=cache_dtype) for _ in range(2))
    slots = torch.randperm(64)[:48]
    ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    # Bitwise what the Python path stores (torch's rounding to nearest even), where it stores it and nowhere else.
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    kv_cache.store(want_k, slots, k)
    kv_cache.store(want_v, slots, v)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    blocks, offsets = slots // 4, slots % 4  # (the layout: model/kv_cache.py)
    for cache, x in ((k_cache, k), (v_cache, v)):
        error = (kv_cache.decode(cache[blocks, :, offsets], torch.float32) - x).abs().amax(-1)
        assert (error <= x.abs().amax(-1) / 254 * 1.0001).all()  # within half a step of an int8 row's scale
        cache[blocks, :, offsets] = 0
        assert not cache.any()  # nothing else written


@pytest.mark.parametrize("qtype", sorted(GGUF_KERNEL_TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 13, 40])
def test_gguf_linear_q8_matches_rounded_activations(ops, qtype, rows):
    # 2 super-blocks of 256 (K-quants: random bytes with valid scales), else 11 blocks of 32: whole and partial
    # groups of 8 blocks, and an odd count (the AVX-512 byte-row kernel takes blocks in pairs).
    in_features = 512 if GGUF_KERNEL_TYPES.get(qtype, "").endswith("_K") else 352
    blocks, dense = random_gguf_weight(qtype, 37, in_features, seed=qtype * 100 + rows)
    split = split_gguf_blocks(blocks, qtype)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # an all-zero block has scale 0
    got = ops.gguf_linear_q8(x, *split, qtype)
    torch.testing.assert_close(got, q8_reference(x, dense), rtol=1e-5, atol=1e-4)
    # and the rounding costs little against the exact product
    exact = F.linear(x, dense)
    assert (got - exact).abs().max() < 0.03 * exact.abs().max()


def skip_unless_the_build_takes(ops, group: int) -> None:
    if group > ops.q4_group_rows():
        pytest.skip(f"{group}-row groups are the AVX-512 VNNI build's (this one takes {ops.q4_group_rows()})")


@pytest.mark.parametrize("qtype", sorted(Q4_TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("group", [8, 16])
def test_gguf_linear_q8_interleaved_q4_matches_rounded_activations(ops, qtype, rows, group):
    """Both layouts where the build takes them: 8-row groups everywhere, 16-row groups on AVX-512 VNNI."""
    skip_unless_the_build_takes(ops, group)
    out_features, in_features = 112, 512  # 14 groups of 8 rows or 7 of 16, 16 blocks
    blocks, dense = random_gguf_weight(qtype, out_features, in_features, seed=qtype * 10 + rows)
    split = split_gguf_blocks(blocks, qtype)
    interleaved = interleave_q4_rows(*split, group)
    assert interleaved[0].shape == (112 // group, 16, 16 * group)
    ids = torch.tensor([0, 7, 8, 111, 50])
    assert torch.equal(dequantized(row_blocks(interleaved, qtype, ids), qtype), dense[ids])  # an embedding's lookups
    x = 3 * torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[0, 32:64] = 0
    got = ops.gguf_linear_q8(x, *interleaved, qtype)  # (x 3 times larger than elsewhere: 3 times the atol)
    torch.testing.assert_close(got, q8_reference(x, dense), rtol=1e-5, atol=3e-4)
    if ops.q4_group_rows() == 8:  # a layout the build does not take
        with pytest.raises(RuntimeError, match="bad interleaved nibble groups"):
            ops.gguf_linear_q8(x, *interleave_q4_rows(*split, 16), qtype)


# Per type: (bytes a block, its bytes past the scales: quants and their high bits) — all set, the largest quants.
_QUANT_BYTES = {"Q5_0": (22, slice(2, 22)), "Q5_1": (24, slice(4, 24)), "Q5_K": (176, slice(16, 176)),
                "Q6_K": (210, slice(0, 192))}


@pytest.mark.parametrize("qtype", sorted(HIGH_BIT_TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 70])
@pytest.mark.parametrize("group", [8, 16])
def test_gguf_linear_q8_interleaved_high_bits_match_rounded_activations(ops, qtype, rows, group):
    """The 5- and 6-bit types at their file's bits a weight (Q5_0, a Q4_K_M file's most common type; Q6_K, its down
    projections, v and LM head; Q5_K / Q5_1, a Q5_K_M file's): nibbles interleaved as Q4's, planes of the high bits,
    Q5_0's and Q6_K's quants 0..31 / 0..63 whose offset of 16 / 32 meets the sums of the rounded x (Q6_K: of its
    halves, a scale per 16), Q5_1's and Q5_K's mins; an embedding's lookups give the gguf package's values. Two rows of
    all-set quants against a block of x at +127 are the int16 sums' worst case (AVX2's maddubs)."""
    skip_unless_the_build_takes(ops, group)
    from gguf import quants

    name = GGUF_KERNEL_TYPES[qtype]
    in_features = 512 if name.endswith("_K") else 352  # (2 super-blocks; 11 blocks)
    blocks, _ = random_gguf_weight(qtype, 112, in_features, seed=600 + rows)  # 14 groups of 8 rows or 7 of 16
    block_bytes, quant_bytes = _QUANT_BYTES[name]
    blocks.view(112, -1, block_bytes)[[3, 60], 1, quant_bytes] = 0xFF
    dense = torch.from_numpy(quants.dequantize(blocks.numpy(), qtype).copy())
    interleaved = interleave_high_bit_rows(split_gguf_blocks(blocks, qtype), qtype, group)
    nb, q6_k = in_features // 32, name == "Q6_K"
    assert interleaved[0].shape == (112 // group, nb, (24 if q6_k else 20) * group)
    assert interleaved[1].shape == (112 // group, nb, (2 if q6_k else 1) * group)
    ids = torch.tensor([0, 7, 8, 111, 50, 3])
    assert torch.equal(dequantized(row_blocks(interleaved, qtype, ids), qtype), dense[ids])
    x = 3 * torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[0, 32:64] = 0
    x[-1, :64] = 5.0  # quantized to +127
    got = ops.gguf_linear_q8(x, *interleaved, qtype)
    torch.testing.assert_close(got, q8_reference(x, dense), rtol=1e-5, atol=3e-4)
    exact = F.linear(x, dense)
    assert (got - exact).abs().max() < 0.03 * exact.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 70])
@pytest.mark.parametrize("group", [8, 16])
def test_gguf_linear_q8_interleaved_q8_0_matches_rounded_activations(ops, rows, group):
    """Q8_0 rows (an LM head) by 16 on AVX-512 VNNI: x offset to unsigned, the offset taken back off as 128 x each
    row's sum of quants; by 8 elsewhere: the weights' magnitudes, their signs moved onto x (random quants: -128 too).
    And a tied embedding's lookups in the layout: the gguf package's values, bitwise."""
    qtype = 8
    blocks, dense = random_gguf_weight(qtype, 48, 352, seed=800 + rows)  # 3 groups of 16 rows (6 of 8), 11 blocks
    interleaved = interleave_byte_rows(*split_gguf_blocks(blocks, qtype), group)
    assert interleaved[0].shape == (48 // group, 11, 32 * group + (2 * group if group == 16 else 0))
    ids = torch.tensor([0, 15, 16, 47, 3, 3])
    assert torch.equal(dequantized(row_blocks(interleaved, qtype, ids), qtype), dense[ids])
    x = 3 * torch.randn(rows, 352, generator=torch.Generator().manual_seed(rows))
    x[0, 32:64] = 0
    if ops.q8_group_rows() != group:  # a layout this build does not take
        with pytest.raises(RuntimeError, match="bad interleaved"):
            ops.gguf_linear_q8(x, *interleaved, qtype)
        return
    got = ops.gguf_linear_q8(x, *interleaved, qtype)
    torch.testing.assert_close(got, q8_reference(x, dense), rtol=1e-5, atol=3e-4)


@pytest.mark.parametrize("qtype", sorted({*Q4_TYPES, *HIGH_BIT_TYPES, 8}))
def test_w4a8_group_kernels_give_each_row_the_same_bits_at_any_row_count(ops, qtype):
    """w4a8's batch invariance within the group kernels: a row's outputs are bitwise the same whether it is multiplied
    alone, in a batch or in a prompt, whichever kernel serves that many rows (the AMX build's int8 tiles from 12
    rows, the VNNI kernels by 16 or AVX2's by 8 below; partial tiles, an odd number of groups, chunks of 128 rows and a
    last partial one)."""
    in_features = 512
    blocks, dense = random_gguf_weight(qtype, 112, in_features, seed=900 + qtype)  # 7 groups of 16 rows (14 of 8)
    split = split_gguf_blocks(blocks, qtype)
    if qtype == 8:
        weights = interleave_byte_rows(*split, ops.q8_group_rows())
    elif qtype in Q4_TYPES:
        weights = interleave_q4_rows(*split, ops.q4_group_rows())
    else:
        weights = interleave_high_bit_rows(split, qtype, ops.q4_group_rows())
    x = 3 * torch.randn(300, in_features, generator=torch.Generator().manual_seed(qtype))
    alone = torch.cat([ops.gguf_linear_q8(row[None], *weights, qtype) for row in x])
    torch.testing.assert_close(alone[:8], q8_reference(x[:8], dense), rtol=1e-5, atol=3e-4)
    for rows in (2, 11, 12, 15, 16, 17, 40, 300):
        assert torch.equal(ops.gguf_linear_q8(x[:rows], *weights, qtype), alone[:rows]), f"{rows} rows"


def test_kernels_give_the_same_bits_while_a_busy_process_holds_back_a_thread(ops):
    """The matmuls' column groups and the attention's tasks are shared among the threads in runs, a thread done with
    its own taking the others' last items (stolen_items.h). With two busy processes on the same cores the threads fall
    behind each other at random, so items change hands: every call must still compute each item once, in the bits
    one thread computes alone."""
    torch.manual_seed(11)
    blocks, _ = random_gguf_weight(3, 1024, 576, seed=11)  # Q4_1, 32 groups of 32 rows (64 of 16)
    split = split_gguf_blocks(blocks, 3)
    grouped = interleave_q4_rows(*split, ops.q4_group_rows())
    x = torch.randn(160, 576)
    block_size, heads, kv_heads, dim = 16, 9, 3, 64
    caches = [torch.randn(400, kv_heads, block_size, dim) for _ in "kv"]
    tables = torch.stack([torch.randperm(400)[:11] for _ in range(32)])
    lens = torch.randint(100, 170, (32,))
    q = torch.randn(32, heads, dim)
    calls = {
        "exact matmul": lambda: ops.gguf_linear(x, *split, 3),
        "w4a8 matmul": lambda: ops.gguf_linear_q8(x, *grouped, 3),
        "attention": lambda: ops.paged_attention(q, *caches, tables, lens, dim**-0.5),
    }
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = {name: call() for name, call in calls.items()}
        torch.set_num_threads(2)
        busy = [subprocess.Popen([sys.executable, "-c", "print(flush=True)\nwhile True: pass"], stdout=subprocess.PIPE)
                for _ in range(2)]
        try:
            for p in busy:
                p.stdout.readline()  # (spinning from here)
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for name, call in calls.items():
                    assert torch.equal(call(), alone[name]), name
        finally:
            for p in busy:
                p.kill()
                p.wait()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("qtype", sorted(Q4_TYPES | HIGH_BIT_TYPES))
def test_a_q4_embedding_under_w4a8_looks_its_rows_up_in_the_interleaved_blocks(qtype):
    """Under w4a8 a Q4 (or 5- or 6-bit) embedding's blocks are interleaved for the int8 kernel; its lookups are still
    the gguf package's rows (once, they read a float32 copy that loading never filled: zeros)."""
    in_features = 256 if GGUF_KERNEL_TYPES[qtype].endswith("_K") else 128
    blocks, dense = random_gguf_weight(qtype, 64, in_features, seed=qtype)
    embedding = VocabParallelEmbedding(64, in_features)
    attach_gguf_blocks(embedding, blocks, qtype, int8_activations=True)
    assert embedding.gguf_parts[0].split[0].dim() == 3 and not embedding.weight.numel()  # interleaved, no float32 copy
    ids = torch.tensor([[0, 5], [33, 63]])
    assert torch.equal(embedding(ids), dense[ids])


def test_a_build_killed_midway_does_not_hang_the_next_start(ops):
    """A server stopped while it compiled the kernels leaves torch's build lock file behind; the next start must not
    wait on it forever (it did): it finds no live build holding the build directory and removes the stale lock."""
    from torch.utils.cpp_extension import _get_build_directory

    # (built variants only: loading one this CPU cannot run dies of SIGILL, as it did on an AVX2-only AMD EPYC)
    variant = next(v for v in dispatch.VARIANTS if not dispatch.missing_features(v) and dispatch.build(v) is ops)
    lock = Path(_get_build_directory(f"slipstream_cpu_kernels_{variant.name}", verbose=False)) / "lock"
    lock.touch()
    try:
        code = (f"from slipstream.kernels import dispatch; "
                f"assert dispatch.build(next(v for v in dispatch.VARIANTS if v.name == {variant.name!r}))")
        subprocess.run([sys.executable, "-c", code], timeout=600, check=True)
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_self_check_passes(ops):
    assert self_check(ops) == {}


def test_self_check_disables_what_disagrees(ops, monkeypatch):
    monkeypatch.setenv(BREAK_ENV, "gguf_linear,rotary_")  # the test hook: these outputs are perturbed
    failed = self_check(ops)
    assert set(failed) == {"gguf_linear", "rotary_"} and "max error 1" in failed["gguf_linear"]
    table = dispatch.KernelTable(dispatch.VARIANTS[0], ops, failed)
    assert table.elementwise("rotary_", torch.zeros(1)) is None and table.elementwise("rms_norm", torch.zeros(1))
    assert not table.layer_stack_usable(False) and not table.layer_stack_usable(True)  # (rotary_ is off)
    assert table.describe().endswith("disabled after their self-check: gguf_linear, rotary_")
    int8_off = dispatch.KernelTable(dispatch.VARIANTS[0], ops, {"gguf_linear_q8": "disagrees"})
    assert int8_off.layer_stack_usable(False) and not int8_off.layer_stack_usable(True)  # exact mode keeps it


def test_variant_choice():
    avx2 = frozenset({"avx2", "fma", "f16c", "sse4_2"})
    assert dispatch.choose_variant(avx2).name == "avx2"
    assert dispatch.choose_variant(frozenset({"sse4_2"})) is None
    assert dispatch.choose_variant(avx2, forced="none") is None
    assert dispatch.choose_variant(frozenset(), forced="avx2") is None  # forced, but the CPU lacks it: warns
    vnni = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    assert dispatch.choose_variant(vnni).name == "avx512_vnni"
    assert dispatch.choose_variant(vnni, forced="avx2").name == "avx2"  # a lower level, forced
    assert dispatch.choose_variant(avx2 | {"avx_vnni"}).name == "avx_vnni"
    amx = vnni | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
    assert dispatch.choose_variant(amx).name == "amx"
    assert dispatch.choose_variant(amx, forced="avx512_vnni").name == "avx512_vnni"
    assert dispatch.choose_variant(amx - {"amx_tile"}).name == "avx512_vnni"
    with pytest.raises(ValueError, match="'avx9000': use one of amx, avx512_vnni, avx_vnni, avx2, none"):
        dispatch.choose_variant(avx2, forced="avx9000")


@pytest.mark.parametrize("variant", [v.name for v in dispatch.VARIANTS])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_dense_linear_matches_f_linear(variant, rows):
    """The dense float32 GEMM a variant takes (oneDNN's for avx512_vnni, F.linear's MKL otherwise), with and
    without a bias, against F.linear: the same products summed in another order. Other dtypes stay with F.linear."""
    chosen = next(v for v in dispatch.VARIANTS if v.name == variant)
    table = dispatch.KernelTable(chosen, None)
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 576), torch.randn(1000, 576), torch.randn(1000)
    linear = table.dense_linear(x, weight)
    uses_onednn = chosen.onednn_gemm and torch.backends.mkldnn.is_available()
    assert linear is (dispatch.onednn_linear if uses_onednn else F.linear)
    for b in (bias, None):
        torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=2e-4)
    assert table.dense_linear(x.bfloat16(), weight.bfloat16()) is F.linear


PROMPT = "The three primary colours are"


@pytest.mark.skipif(dispatch.kernels().ops is None, reason="no compiled kernels on this machine")
def test_a_kernel_failing_its_self_check_is_not_used(llm_fp32):
    """A server whose block matmul and decode attention fail their self-check (the test hook) warns, naming them,
    and serves the same tokens as the engine that uses them: on the dense PyTorch path."""
    want = llm_fp32.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text
    broken = "gguf_linear,paged_attention"
    with running_server(env={BREAK_ENV: broken}) as server:
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        version = httpx.get(f"{server.url}/version", timeout=30).json()
        log = server.log()
    assert got == want
    for name in broken.split(","):
        assert f"CPU kernel {name} ({dispatch.kernels().variant.name}) disagrees with PyTorch" in log
    assert version["cpu_kernels"].endswith("disabled after their self-check: gguf_linear, paged_attention")


def test_w4a8_needs_no_other_flag(llm_fp32):
    """`--quantization w4a8` alone (on any CPU with AVX2): it brings its dtype and kernels, and serves."""
    if dispatch.kernels().ops is None:
        pytest.skip("w4a8 needs the compiled kernels (a CPU with AVX2/FMA/F16C)")
    with running_server("--quantization", "w4a8") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                                max_tokens=8, temperature=0)
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        assert "float32 w4a8" in server.log()
