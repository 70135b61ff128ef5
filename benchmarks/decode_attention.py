"""Decode attention alone: the compiled paged_attention kernel over each KV-cache type, in one process.

    .venv/bin/python benchmarks/decode_attention.py [--batch 8 32] [--context 200 164] [--rounds 5]
    .venv/bin/python benchmarks/decode_attention.py --kernels DIR_A DIR_B [--batch 1 1] [--context 165 2000]

A step's attention over SmolLM2-135M's 30 layers (9 query heads, 3 KV heads of 64) for `batch` sequences of
`context` tokens, their blocks scattered. "cold": 30 layers' caches in turn, as a step reads them (from DRAM at
these sizes: the weights stream through the CPU caches between layers); "hot": one layer's cache 30 times. The
cache types are timed alternately, `rounds` times, and the median kept: this VM's speed drifts by a quarter within
minutes, so only ratios measured together mean anything. `--kernels`: two directories of kernel sources (as
`matmul_rows.py --kernels` takes), built as this machine's variant and timed alternately on each cache type, and
whether their outputs are bitwise equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine_ab import kernel_table

from slipstream.kernels import kernels
from slipstream.model import kv_cache

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYERS = 9, 3, 64, 16, 30
CACHE_DTYPES = (torch.float32, torch.float16, torch.int8)


def step_ms(ops, caches, tables, lens, q, repeats: int) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        for k, v in caches:
            ops.paged_attention(q, k, v, tables, lens, HEAD_DIM**-0.5)
    return (time.perf_counter() - t) * 1e3 / repeats * LAYERS / len(caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[200, 164], help="tokens a sequence, by batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernels", nargs=2, metavar="DIR", help="A/B two directories of kernel sources")
    args = parser.parse_args()
    table = kernels()
    if not table.has("paged_attention"):
        raise SystemExit("no compiled paged_attention on this machine")
    print(f"kernels: {table.variant.name}; {torch.get_num_threads()} threads")
    builds = [kernel_table(d).ops for d in args.kernels] if args.kernels else None
    for batch, context in zip(args.batch, args.context, strict=True):
        blocks = -(-context // BLOCK_SIZE)
        tables = torch.randperm(batch * blocks + 1)[: batch * blocks].view(batch, blocks)
        lens, q = torch.full((batch,), context), torch.randn(batch, HEADS, HEAD_DIM)
        for label, layers, repeats in (("cold", LAYERS, 10), ("hot", 1, 300)):
            caches = {dtype: [tuple(kv_cache.encode(torch.randn(batch * blocks + 1, KV_HEADS, BLOCK_SIZE, HEAD_DIM),
                                                    dtype) for _ in range(2)) for _ in range(layers)]
                      for dtype in CACHE_DTYPES}
            if builds:
                compare_builds(builds, caches, tables, lens, q, repeats, args.rounds, f"batch {batch}, {context} "
                               f"tokens, {label}")
                continue
            times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in CACHE_DTYPES}
            for _ in range(args.rounds):
                for dtype in CACHE_DTYPES:
                    times[dtype].append(step_ms(table.ops, caches[dtype], tables, lens, q, repeats))
            median = {dtype: statistics.median(t) for dtype, t in times.items()}
            half = median[torch.float16]
            print(f"batch {batch}, {context} tokens, {label}: " + ", ".join(
                f"{str(d).removeprefix('torch.')} {m:.2f} ms ({half / m:.2f}x float16)" for d, m in median.items()))


def compare_builds(builds, caches, tables, lens, q, repeats: int, rounds: int, label: str) -> None:
    for dtype, layers in caches.items():
        k, v = layers[0]
        outputs = [ops.paged_attention(q, k, v, tables, lens, HEAD_DIM**-0.5) for ops in builds]
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for i, ops in enumerate(builds):
                times[i].append(step_ms(ops, layers, tables, lens, q, repeats))
        a, b = (statistics.median(t) for t in times)
        print(f"{label}, {str(dtype).removeprefix('torch.')}: A {a:.3f} ms, B {b:.3f} ms: B {a / b:.2f}x A, "
              f"{'bitwise equal' if torch.equal(*outputs) else 'outputs differ'}")


if __name__ == "__main__":
    main()
