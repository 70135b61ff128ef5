"""The compiled CPU kernels against plain PyTorch on the same numbers: every activation-row count
the tiling handles (8/4/2/1 pieces) and output sizes that are not a multiple of the row tile."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from slipstream.kernels import GGUF_KERNEL_TYPES, cpu_ops

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="this CPU has no AVX2/FMA/F16C or no compiler")


@pytest.mark.parametrize("qtype", sorted(GGUF_KERNEL_TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 15])
def test_gguf_linear_matches_dequantized_matmul(qtype, rows):
    rng = np.random.default_rng(qtype * 100 + rows)
    out_features, in_features = 37, 96
    weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
    blocks = quants.quantize(weight, GGMLQuantizationType(qtype))
    dense = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType(qtype)).copy())
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    got = ops.gguf_linear(x, torch.from_numpy(blocks), qtype, out_features)
    torch.testing.assert_close(got, F.linear(x, dense), rtol=1e-5, atol=1e-5)


def test_paged_attention_decode_matches_sdpa():
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 6, 2, 64, 4, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    lens = torch.tensor([1, 7, 13])
    tables = torch.stack([torch.randperm(num_blocks)[:4] for _ in lens])
    q = torch.randn(len(lens), heads, dim)
    got = ops.paged_attention_decode(q, k_cache, v_cache, tables, lens, dim**-0.5)
    for i, n in enumerate(lens.tolist()):
        k = k_cache[tables[i]].flatten(0, 1)[:n].transpose(0, 1)  # [Hkv, n, D]
        v = v_cache[tables[i]].flatten(0, 1)[:n].transpose(0, 1)
        want = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, enable_gqa=True).squeeze(1)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
