#!/usr/bin/env python3
"""Where an engine step's time goes, in steady decode: schedule, prepare (batch -> tensors), forward
(model + logits), sampling, output processing (detokenisation, stops) and the rest of `step()`.

    .venv/bin/python benchmarks/step_profile.py --batch 1 32 [--threads 2 1]

Each phase is timed by wrapping the engine's own methods; the HTTP layer is not included (compare
with `slipstream bench serve`'s ITL at the same concurrency to see what serving adds).
`--prompt-cost` also times steps that take a new prompt beside the batch's decodes (as a served load's steps do when
a request arrives), alternated with decode-only steps: what a prompt token costs beside a decode row.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from slipstream import LLM, SamplingParams

PHASES = {  # (engine attribute, method) -> label
    ("scheduler", "schedule"): "schedule",
    ("runner", "prepare"): "prepare",
    ("runner", "execute"): "forward+logits",
    ("runner", "sampler"): "sample",
    ("output_processor", "process"): "output processing",
}


def profile(llm: LLM, batch: int, steps: int, prompt_len: int, prompt_cost: bool) -> None:
    engine = llm.engine
    spent: dict[str, float] = collections.defaultdict(float)
    originals = []
    for (owner_name, method), label in PHASES.items():
        owner = getattr(engine, owner_name)
        original = getattr(owner, method)
        originals.append((owner, method, original))

        def timed(*args, _f=original, _label=label, **kwargs):
            t = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - t

        setattr(owner, method, timed)
    try:
        params = SamplingParams(temperature=0, max_tokens=3 * steps + 16, ignore_eos=True)
        sentence = llm.tokenizer.encode("Tell me a long story about a dragon and a lighthouse keeper.")
        prompt = (sentence * (prompt_len // len(sentence) + 1))[: prompt_len - 1]
        for i in range(batch):
            engine.add_request(f"profile-{i}", [i + 10] + prompt, params)  # distinct: no shared prefix blocks
        while any(s.num_output_tokens == 0 for s in engine.seqs.values()):  # prefill out of the way
            engine.step()
        spent.clear()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = (time.perf_counter() - t) / steps * 1e3
        phases = dict(spent)
        beside = prompt_beside(engine, steps, prompt) if prompt_cost else None
    finally:
        for owner, method, original in originals:
            setattr(owner, method, original)
        for request_id in list(engine.seqs):
            engine.abort_request(request_id)
    print(f"batch {batch}: {total:.2f} ms per step, {batch / total * 1e3:.0f} tokens/s")
    for label, seconds in phases.items():
        print(f"  {label:18s} {seconds / steps * 1e3:8.2f} ms")
    print(f"  {'rest of step()':18s} {total - sum(phases.values()) / steps * 1e3:8.2f} ms")
    if beside is not None:
        decode, with_prompt = beside
        print(f"  with a {prompt_len}-token prompt beside: {with_prompt:.2f} ms against {decode:.2f} (medians): "
              f"{(with_prompt - decode) / prompt_len:.3f} ms a prompt token, {decode / batch:.3f} ms a decode row")


def prompt_beside(engine, rounds: int, prompt: list[int]) -> tuple[float, float]:
    """Median step times (ms) of decode-only steps and of steps that also prefill a new `prompt`, alternated."""
    decode, with_prompt = [], []
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(rounds):
        t = time.perf_counter()
        engine.step()
        decode.append(time.perf_counter() - t)
        engine.add_request(f"beside-{i}", [i + 1000] + prompt, params)  # (distinct first token: no cached prefix)
        t = time.perf_counter()
        engine.step()
        with_prompt.append(time.perf_counter() - t)
    return statistics.median(decode) * 1e3, statistics.median(with_prompt) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="decode batch sizes (default: 1 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size (default: 20)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default=None, help="w4a8 (default: none, exact)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto | float16 | float32 | bfloat16 | int8")
    parser.add_argument("--prompt-len", type=int, default=100, help="prompt tokens per sequence (default: 100)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="compute thread counts to profile in turn (default: torch's): a step that 2 threads "
                             "take well over half the time 1 does has a part that does not scale (Python, the "
                             "small ops run on one thread, memory-bound work)")
    parser.add_argument("--prompt-cost", action="store_true",
                        help="also time steps that prefill a new prompt of --prompt-len tokens beside the batch")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=512 << 20)
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        print(f"{threads} compute thread{'s' if threads > 1 else ''}:")
        for batch in args.batch:
            profile(llm, batch, args.steps, args.prompt_len, args.prompt_cost)


if __name__ == "__main__":
    main()
