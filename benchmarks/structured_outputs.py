"""What constrained decoding costs: a batch of streamed requests with a JSON schema against the same
batch unconstrained, a mixed batch (half constrained), and the time to compile a schema.

    .venv/bin/python benchmarks/structured_outputs.py [--batch 8] [--rounds 5] [--output-len 128]

Starts its own server (the default model unless `--server-args` says otherwise), then runs the three
batches in turn, `--rounds` times, interleaved so that the machine's slow and fast phases hit each
alike; medians over rounds. Every request streams exactly `--output-len` tokens: the schema asks for a
long array, so the grammar is still open when max_tokens ends it. TPOT is per request, (latency -
TTFT) / (tokens - 1). Writes benchmarks/results/structured-<time>.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from slipstream.bench.serve import PromptFactory, RequestResult, _request, load_prompt_tokenizer

ROOT = Path(__file__).resolve().parent
# Long enough that no request completes its grammar within the output length.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 100, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
                       "city": {"type": "string", "maxLength": 16}},
        "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
# What a typical client sends (an instructor / LangChain model of a few fields).
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}},
                   "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                                "city": {"type": "string"}},
                               "required": ["street", "city"]}},
    "required": ["name", "age", "email"],
}


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slipstream.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port",
           str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up")


def body(prompt: str, output_len: int, schema: dict | None) -> dict:
    b = {"messages": [{"role": "user", "content": prompt}], "max_tokens": output_len, "temperature": 0,
         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if schema is None:
        b["min_tokens"] = output_len
    else:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    return b


def tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / max(r.output_tokens - 1, 1)


async def run_batch(client: httpx.AsyncClient, prompts: list[str], schemas: list[dict | None],
                    output_len: int) -> list[RequestResult]:
    results = await asyncio.gather(*(_request(client, "/v1/chat/completions", body(p, output_len, s))
                                     for p, s in zip(prompts, schemas, strict=True)))
    for r in results:
        if not r.ok or r.output_tokens != output_len:
            raise SystemExit(f"a request failed or ended early: {r}")
    return list(results)


async def measure(args: argparse.Namespace, base_url: str) -> dict:
    factory = PromptFactory(load_prompt_tokenizer(None), chat=True, seed=args.seed)
    b = args.batch
    configs = {"unconstrained": [None] * b, "json_schema": [LONG_SCHEMA] * b,
               "mixed": [LONG_SCHEMA if i % 2 == 0 else None for i in range(b)]}
    per_round: dict[str, list[dict]] = {name: [] for name in configs}
    async with httpx.AsyncClient(base_url=base_url, timeout=600, trust_env=False) as client:
        await run_batch(client, [factory.make(args.input_len)], [LONG_SCHEMA], 8)  # warm-up, compiles the schema
        for _ in range(args.rounds):
            for name, schemas in configs.items():
                results = await run_batch(client, [factory.make(args.input_len) for _ in range(b)], schemas,
                                          args.output_len)
                constrained = [tpot(r) for r, s in zip(results, schemas, strict=True) if s is not None]
                free = [tpot(r) for r, s in zip(results, schemas, strict=True) if s is None]
                per_round[name].append({"tpot_constrained_ms": 1e3 * statistics.mean(constrained) if constrained
                                        else None,
                                        "tpot_unconstrained_ms": 1e3 * statistics.mean(free) if free else None,
                                        "ttft_ms": 1e3 * statistics.mean(r.ttft for r in results)})
        # Time to first token for a schema never seen (compiled behind the prefill) vs one in the cache.
        first, cached = [], []
        for i in range(3):
            fresh = json.loads(json.dumps(TYPICAL_SCHEMA))
            fresh["properties"][f"field_{args.seed}_{i}_{time.time_ns()}"] = {"type": "integer"}
            for out in (first, cached):
                r = (await run_batch(client, [factory.make(args.input_len)], [fresh], 4))[0]
                out.append(1e3 * r.ttft)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in per_round[name] if r[key] is not None]
        return statistics.median(values) if values else None

    return {
        "rounds": per_round,
        "tpot_ms": {"unconstrained": median("unconstrained", "tpot_unconstrained_ms"),
                    "json_schema": median("json_schema", "tpot_constrained_ms"),
                    "mixed_constrained": median("mixed", "tpot_constrained_ms"),
                    "mixed_unconstrained": median("mixed", "tpot_unconstrained_ms")},
        "ttft_fresh_schema_ms": statistics.median(first),
        "ttft_cached_schema_ms": statistics.median(cached),
    }


def compile_times() -> dict:
    """The grammar engine alone, in this process, over the default model's tokenizer."""
    import xgrammar as xgr

    from slipstream.engine.structured_output import build_grammar
    from slipstream.model.loader import hf_directory, load_config, load_tokenizer
    from slipstream.sampling_params import StructuredOutputsParams

    model_dir = hf_directory(None)
    tokenizer, vocab = load_tokenizer(model_dir), load_config(model_dir).vocab_size
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab), max_threads=1,
                                   cache_enabled=False)
    tokenizer_info_ms = 1e3 * (time.perf_counter() - t0)
    times = {}
    for name, schema in (("typical", TYPICAL_SCHEMA), ("long_array", LONG_SCHEMA)):
        t0 = time.perf_counter()
        compiler.compile_grammar(build_grammar(StructuredOutputsParams(json=schema)))
        times[name] = 1e3 * (time.perf_counter() - t0)
    return {"tokenizer_info_ms": tokenizer_info_ms, "compile_ms": times}


def engine_steps(args: argparse.Namespace) -> dict:
    """Median decode-step time of the engine alone (no HTTP, so far less noise), for the same three
    batches: what the grammar work (bitmask fill, masking, matcher advance) adds to a step."""
    import slipstream.model.sampler as sampler_module
    from slipstream import LLM, SamplingParams
    from slipstream.sampling_params import StructuredOutputsParams

    llm = LLM(dtype="float32", kv_cache_memory=512 << 20)
    engine, factory = llm.engine, PromptFactory(llm.tokenizer, chat=True, seed=args.seed)
    # Time the grammar work itself: the manager's bitmask and accept, the sampler's masking.
    grammar_s = [0.0]

    def timed(fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                grammar_s[0] += time.perf_counter() - t0
        return call

    manager = engine.structured_output
    manager.bitmask, manager.accept = timed(manager.bitmask), timed(manager.accept)
    sampler_module.apply_bitmask = timed(sampler_module.apply_bitmask)
    spec = StructuredOutputsParams(json=LONG_SCHEMA)
    b = args.batch
    configs = {"unconstrained": [None] * b, "json_schema": [spec] * b,
               "mixed": [spec if i % 2 == 0 else None for i in range(b)]}
    steps: dict[str, list[float]] = {name: [] for name in configs}
    grammar: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, specs in configs.items():
            for i, s in enumerate(specs):
                prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": factory.make(args.input_len)}],
                                                           add_generation_prompt=True, return_dict=False)
                engine.add_request(f"{name}-{r}-{i}", prompt, SamplingParams(
                    temperature=0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=s))
            while engine.has_unfinished():
                decoding = len(engine.scheduler.running) == b and not engine.scheduler.waiting and all(
                    seq.num_computed_tokens == seq.num_tokens - 1 for seq in engine.scheduler.running)
                grammar_s[0] = 0.0
                t0 = time.perf_counter()
                engine.step()
                if decoding:
                    steps[name].append(1e3 * (time.perf_counter() - t0))
                    grammar[name].append(1e3 * grammar_s[0])
    return {name: statistics.median(v) for name, v in steps.items()} | {
        f"{name}_grammar_work": statistics.median(v) for name, v in grammar.items()}


def report(result: dict, args: argparse.Namespace) -> str:
    t = result["tpot_ms"]
    base = t["unconstrained"]

    def pct(x: float) -> str:
        return f"{100 * (x / base - 1):+.1f} %"

    c, e = result["compile"], result["engine_step_ms"]

    def step_pct(x: float) -> str:
        return f"{100 * (x / e['unconstrained'] - 1):+.1f} %"

    return "\n".join([
        f"# Structured outputs ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores. Server: default model "
        f"{' '.join(args.server_args) or '(default flags)'}; batch {args.batch} streamed chat requests, "
        f"~{args.input_len} prompt tokens, exactly {args.output_len} output tokens, greedy; median of "
        f"{args.rounds} interleaved rounds.",
        "",
        "| batch | TPOT (ms) | vs unconstrained |",
        "|---|---|---|",
        f"| {args.batch} unconstrained | {base:.2f} | |",
        f"| {args.batch} with a json_schema | {t['json_schema']:.2f} | {pct(t['json_schema'])} |",
        f"| mixed: the constrained half | {t['mixed_constrained']:.2f} | {pct(t['mixed_constrained'])} |",
        f"| mixed: the unconstrained half | {t['mixed_unconstrained']:.2f} | {pct(t['mixed_unconstrained'])} |",
        "",
        f"The engine alone (no HTTP), median decode step of the same batches: unconstrained {e['unconstrained']:.2f} "
        f"ms, all with the json_schema {e['json_schema']:.2f} ms ({step_pct(e['json_schema'])}), mixed "
        f"{e['mixed']:.2f} ms ({step_pct(e['mixed'])}: what the unconstrained half of a mixed batch pays). Of "
        f"those steps, the grammar work itself (bitmask fill, masking, matcher advance; timed around it) takes "
        f"{e['json_schema_grammar_work']:.2f} ms for {args.batch} constrained rows "
        f"({100 * e['json_schema_grammar_work'] / e['json_schema']:.1f} % of the step) and "
        f"{e['mixed_grammar_work']:.2f} ms for {args.batch // 2} "
        f"({100 * e['mixed_grammar_work'] / e['mixed']:.1f} %).",
        "",
        f"Compiling (xgrammar, one thread): tokenizer info once per server {c['tokenizer_info_ms']:.0f} ms; "
        f"a typical schema (5 fields, nested object, array) {c['compile_ms']['typical']:.1f} ms; the benchmark's "
        f"long-array schema {c['compile_ms']['long_array']:.1f} ms.",
        f"TTFT of one request (~{args.input_len} prompt tokens) with a schema never seen: "
        f"{result['ttft_fresh_schema_ms']:.0f} ms; the same schema again (cached): "
        f"{result['ttft_cached_schema_ms']:.0f} ms.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8197)
    p.add_argument("--server-args", type=shlex.split, default=[], help="extra server flags, one string")
    args = p.parse_args()
    result = {"compile": compile_times(), "engine_step_ms": engine_steps(args), "cpu": cpu_name(), "args": vars(args)}
    proc = start_server(args.port, args.server_args)
    try:
        result |= asyncio.run(measure(args, f"http://127.0.0.1:{args.port}"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = report(result, args)
    stamp = time.strftime("%Y%m%d-%H%M")
    out = ROOT / "results" / f"structured-{stamp}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(text)


if __name__ == "__main__":
    main()
