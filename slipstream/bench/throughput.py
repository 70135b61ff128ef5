"""Offline throughput: N random prompts of fixed length through the engine, exactly M tokens out each.

With `--num-prompts 1` the decode rate per sequence is the single-stream decode speed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slipstream.bench.report import emit, peak_rss_mib, summarize_ms
from slipstream.entrypoints.openai.args import memory_size
from slipstream.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model to load (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 (default: auto)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--quantization", default=None, help="w4a8 (default: none, exact)")
    parser.add_argument("--num-prompts", type=int, default=32, help="number of prompts (default: 32)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: 128)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks sharing the model (default: 1)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size limit (default: engine's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step (default: engine's)")
    parser.add_argument("--kv-cache-memory", type=memory_size, default=None,
                        help="KV cache budget: bytes or a size like 256MiB (default: engine's share of free memory)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def random_prompts(tokenizer, vocab_size: int, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """Uniformly random non-special token ids: no two prompts share a prefix the cache could reuse."""
    allowed = np.setdiff1d(np.arange(min(vocab_size, len(tokenizer))), tokenizer.all_special_ids)
    rng = np.random.default_rng(seed)
    return rng.choice(allowed, size=(num_prompts, input_len)).tolist()


def _generate(engine, prompts: list[list[int]], params: SamplingParams, tag: str) -> list[tuple[float, float, int]]:
    """Runs the prompts to completion as one batch; per request (TTFT s, latency s, output tokens).
    Drives the engine directly because `LLM.generate` does not expose per-token arrival times."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.arrival_times:
                first.setdefault(out.request_id, out.arrival_times[0])
                last[out.request_id] = out.arrival_times[-1]
            count[out.request_id] = out.num_output_tokens
    return [(first[rid], last[rid], count[rid]) for rid in first]


def run(args: argparse.Namespace) -> int:
    from slipstream import LLM
    from slipstream.model.locate import DEFAULT_MODEL_NAME

    options = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
               "kv_cache_memory": args.kv_cache_memory}
    llm = LLM(args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
              quantization=args.quantization, **{k: v for k, v in options.items() if v is not None})
    engine = llm.engine
    # One extra prompt warms the kernels up (first calls of a shape are slow) outside the timing.
    warmup, *prompts = random_prompts(llm.tokenizer, engine.hf_config.vocab_size, args.num_prompts + 1,
                                      args.input_len, args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True)
    _generate(engine, [warmup], SamplingParams(temperature=args.temperature, max_tokens=2, ignore_eos=True), "warmup")

    start = time.perf_counter()
    timings = _generate(engine, prompts, params, "bench")
    elapsed = time.perf_counter() - start
    engine.shutdown()  # tensor-parallel workers

    output_tokens = sum(n for _, _, n in timings)
    tpots = [(latency - ttft) / (n - 1) for ttft, latency, n in timings if n > 1]
    tpot = summarize_ms(tpots)
    result = {
        "model": args.model or DEFAULT_MODEL_NAME,
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "device": str(engine.runner.device),
        "tensor_parallel_size": args.tensor_parallel_size,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "output_tokens": output_tokens,
        "load_s": engine.load_seconds,
        "elapsed_s": elapsed,
        "requests_per_s": len(timings) / elapsed,
        "output_tok_per_s": output_tokens / elapsed,
        "total_tok_per_s": (output_tokens + args.input_len * len(timings)) / elapsed,
        "ttft_ms": summarize_ms([ttft for ttft, _, _ in timings]),
        "tpot_ms": tpot,
        "decode_tok_per_s_per_seq": 1000 / tpot["mean"] if tpot["mean"] else 0.0,
        "peak_rss_mib": peak_rss_mib(),
    }
    emit("Offline Throughput Benchmark", result, args.json)
    return 0
