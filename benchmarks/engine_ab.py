#!/usr/bin/env python3
"""Two engine configurations' decode steps, alternated in one process: the fair A/B on a VM whose speed drifts by a
quarter within minutes (two servers benchmarked in turn measure the drift as much as the change).

    .venv/bin/python benchmarks/engine_ab.py --a quantization=w4a8 kv_cache_dtype=float16 \\
        --b quantization=w4a8 kv_cache_dtype=int8 [--batch 1 8 32] [--chunks 16]

Each configuration is an `LLM(...)` of the embedded model (keyword=value pairs); `kernels=DIR` serves it with the
kernels built from the sources in DIR (this machine's best variant; e.g. a `git worktree` of an older commit's
slipstream/kernels), the A/B of a kernel change. At each batch size both engines
take the same distinct prompts, finish their prefill, then run `chunks` rounds of 10 decode steps each in turn
(contexts grow from the prompt's length by 10 tokens a round); the median step time of each and the rounds in which
B was faster are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from slipstream import LLM, SamplingParams
from slipstream.kernels import dispatch

STEPS_A_CHUNK = 10


def kernel_table(sources: str) -> dispatch.KernelTable:
    """This machine's kernel table, its variant built from the .cpp files in `sources` instead of the package's."""
    variant = dispatch.kernels().variant
    ops = dispatch.build(variant, Path(sources))
    if ops is None:
        raise SystemExit(f"the kernels in {sources} did not build (the warning above says why)")
    return dispatch.KernelTable(variant, ops)


@contextlib.contextmanager
def serving(table: dispatch.KernelTable) -> Iterator[None]:
    """Model code asks `dispatch.kernels()` on every op: the configuration's table while it runs."""
    saved, dispatch._table = dispatch._table, table
    try:
        yield
    finally:
        dispatch._table = saved


def engine(pairs: list[str]) -> tuple[LLM, dispatch.KernelTable]:
    options = dict(pair.split("=", 1) for pair in pairs)
    sources = options.pop("kernels", None)
    table = kernel_table(sources) if sources else dispatch.kernels()
    with serving(table):
        return LLM(kv_cache_memory=512 << 20, **options), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, metavar="KEY=VALUE")
    parser.add_argument("--b", nargs="+", required=True, metavar="KEY=VALUE")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=150)
    args = parser.parse_args()
    engines, tables = {}, {}
    for name, pairs in (("A", args.a), ("B", args.b)):
        engines[name], tables[name] = engine(pairs)
    sentence = engines["A"].tokenizer.encode("Tell me a long story about a dragon and a lighthouse keeper.")
    prompt = (sentence * (args.prompt_len // len(sentence) + 1))[: args.prompt_len - 1]
    params = SamplingParams(temperature=0, max_tokens=STEPS_A_CHUNK * args.chunks + 16, ignore_eos=True)
    print(f"A: {' '.join(args.a)}\nB: {' '.join(args.b)}")
    for batch in args.batch:
        for name, llm in engines.items():
            for i in range(batch):
                llm.engine.add_request(f"ab-{i}", [i + 10] + prompt, params)  # distinct: no shared prefix blocks
            with serving(tables[name]):
                while any(s.num_output_tokens == 0 for s in llm.engine.seqs.values()):
                    llm.engine.step()
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.chunks):
            for name, llm in engines.items():
                with serving(tables[name]):
                    t = time.perf_counter()
                    for _ in range(STEPS_A_CHUNK):
                        llm.engine.step()
                times[name].append((time.perf_counter() - t) / STEPS_A_CHUNK * 1e3)
        for llm in engines.values():
            for request_id in list(llm.engine.seqs):
                llm.engine.abort_request(request_id)
        a, b = statistics.median(times["A"]), statistics.median(times["B"])
        wins = sum(x > y for x, y in zip(times["A"], times["B"], strict=True))
        print(f"batch {batch}: A {a:.2f} ms, B {b:.2f} ms a step (medians); B {a / b:.2f}x A's speed, "
              f"faster in {wins} of {args.chunks} rounds")


if __name__ == "__main__":
    main()
