#!/usr/bin/env python3
"""What a step's matmuls cost at a few activation rows: every block-served linear layer of the embedded model through
the kernel that serves it at that row count, layer after layer as a step runs them (so the weights come from DRAM,
not a cache), summed by projection.

    .venv/bin/python benchmarks/matmul_rows.py [--model FILE.gguf] [--quantization w4a8] [--rows 1 2 3 4 8]
    .venv/bin/python benchmarks/matmul_rows.py --kernels DIR_A DIR_B [--rows 8 9 12] [--quantization w4a8]

At batch 1 a decode step reads every weight once; what each extra row (a batched sequence, an n-gram guess) adds is
the arithmetic the kernel does per row. The first pass is a warm-up (page faults, the kernels' first calls).
`--kernels`: the A/B of a kernel change, two directories of kernel sources (e.g. a `git worktree` of an older
commit's slipstream/kernels) built as this machine's variant, their whole steps' matmuls alternated in one process
(this VM's speed drifts within minutes), each build's median and whether their outputs are bitwise equal.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from engine_ab import kernel_table

from slipstream import LLM
from slipstream.kernels import kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--quantization", default=None, help="w4a8 (default: none, exact)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--repeats", type=int, default=20, help="passes over all layers per row count (default: 20)")
    parser.add_argument("--kernels", nargs=2, metavar="DIR", help="A/B two directories of kernel sources")
    args = parser.parse_args()
    llm = LLM(args.model, quantization=args.quantization, kv_cache_memory=64 << 20)
    table = kernels()
    model = llm.engine.runner.model
    hidden, intermediate = model.args.hidden_size, model.args.intermediate_size  # (a Llama-family model)
    layers = [(name.rsplit(".", 1)[-1], module) for name, module in model.named_modules()
              if getattr(module, "gguf_parts", None) is not None and not name.endswith("embed_tokens")]
    print(f"{len(layers)} block-served layers, CPU kernels {table.variant.name if table.variant else 'none'}")
    if args.kernels:
        compare_builds([kernel_table(d) for d in args.kernels], layers, hidden, intermediate, args)
        return
    for rows in [args.rows[0], *args.rows]:  # (the first: warm-up)
        calls = step_calls(table, layers, rows, hidden, intermediate)
        spent: dict[str, float] = collections.defaultdict(float)
        for _ in range(args.repeats):
            for kind, kernel, parts, x in calls:
                start = time.perf_counter()
                for split, qtype in parts:
                    kernel(x, *split, qtype)
                spent[kind] += time.perf_counter() - start
        ms = {kind: seconds / args.repeats * 1e3 for kind, seconds in spent.items()}
        print(f"{rows} rows: {sum(ms.values()):.2f} ms (" + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()) + ")")


def step_calls(table, layers, rows: int, hidden: int, intermediate: int, xs: list | None = None) -> list:
    """(kind, kernel, parts, x) for each layer: the kernel `table` serves it with at `rows` rows, and x (`xs`'s, or
    random)."""
    calls = []
    for i, (kind, module) in enumerate(layers):
        kernel = table.gguf_matmul(module, rows)
        if kernel is None:
            raise SystemExit(f"no block kernel serves {kind} at {rows} rows here")
        x = xs[i] if xs else torch.randn(rows, intermediate if kind == "down_proj" else hidden)
        calls.append((kind, kernel, module.gguf_parts, x))
    return calls


def compare_builds(tables, layers, hidden: int, intermediate: int, args) -> None:
    """Each row count: both builds' steps of matmuls in turn on the same x, `repeats` times after a warm-up pair."""
    for rows in args.rows:
        first = step_calls(tables[0], layers, rows, hidden, intermediate)
        builds = [first, step_calls(tables[1], layers, rows, hidden, intermediate, [x for *_, x in first])]
        times: list[list[float]] = [[], []]
        for repeat in range(args.repeats + 1):
            for calls, spent in zip(builds, times, strict=True):
                start = time.perf_counter()
                for _, kernel, parts, x in calls:
                    for split, qtype in parts:
                        kernel(x, *split, qtype)
                if repeat:
                    spent.append((time.perf_counter() - start) * 1e3)
        (_, kernel_a, parts, x), (_, kernel_b, _, _) = builds[0][0], builds[1][0]
        same = all(torch.equal(kernel_a(x, *split, qtype), kernel_b(x, *split, qtype)) for split, qtype in parts)
        a, b = (statistics.median(t) for t in times)
        print(f"{rows} rows: A {a:.2f} ms, B {b:.2f} ms (B {a / b:.3f}x A's speed), outputs bitwise equal: {same}")


if __name__ == "__main__":
    main()
