"""Attention over the paged KV cache.

New keys/values are written into their cache slots first. Where the compiled kernel reads the cache, every query
row then attends through it to the keys and values as the cache holds them (as vLLM v1's paged attention does), the
whole step in one call (a prompt chunk's rows share its block table: `AttentionContext.query_rows`). A row's
arithmetic is then the same whichever step, batch or path computes it, so a prompt found in the prefix cache gives
the same logits as when it was computed and a request in a batch the same as alone (before, a causal prompt kernel
over the unrounded keys summed in another order: under rounding, logprobs 0.1-0.3 apart between two identical
requests). Otherwise (CUDA, caches the kernel does not read) decode tokens attend to their gathered block tables and
each prompt chunk causally to its own context (straight to the fresh keys when it has no cached prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.kernels import kernels
from slipstream.model import kv_cache
from slipstream.model.context import get_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5  # the same as SDPA's default, for the compiled kernel
        # [num_blocks, num_kv_heads, block_size, row] each (model/kv_cache.py); bound by the model runner.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H * D]"""
        ctx = get_context()
        kc, vc = self.k_cache, self.v_cache
        table = kernels()
        # The fallbacks convert on the way in and out (kv_cache.encode / decode): the cache may differ from the
        # model's dtype.
        write_kv_cache = table.attention("write_kv_cache", q, kc)
        paged = table.attention("paged_attention", q, kc)
        if write_kv_cache is not None:
            write_kv_cache(k, v, kc, vc, ctx.slot_mapping)
        elif kc.numel():
            kv_cache.store(kc, ctx.slot_mapping, k)
            kv_cache.store(vc, ctx.slot_mapping, v)
        if paged is not None:
            return paged(q, kc, vc, *ctx.query_rows, self.scale).flatten(1)
        nd, out = ctx.num_decode, torch.empty_like(q)
        if nd:
            bt = ctx.decode_block_tables
            kk, vv = kv_cache.gather(kc, bt, q.dtype), kv_cache.gather(vc, bt, q.dtype)  # [B, Hkv, L, D]
            o = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), kk, vv, attn_mask=ctx.decode_mask, enable_gqa=True
            )
            out[:nd] = o.squeeze(2)
        for chunk in ctx.prefills:
            s, e = chunk.start, chunk.start + chunk.length
            qq = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
            if chunk.fresh:
                kk = k[s:e].transpose(0, 1).unsqueeze(0)
                vv = v[s:e].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            else:
                n = chunk.context_len
                kk = kv_cache.gather(kc, chunk.block_table, q.dtype)[:, :n].unsqueeze(0)
                vv = kv_cache.gather(vc, chunk.block_table, q.dtype)[:, :n].unsqueeze(0)
                mask = torch.arange(n, device=q.device) < chunk.query_lens.unsqueeze(1)  # [length, n]: causal
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
            out[s:e] = o.squeeze(0).transpose(0, 1)
        return out.flatten(1)
