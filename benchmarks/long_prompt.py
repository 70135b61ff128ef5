"""A long prompt beside a stream: what one 7000-token prompt does to another client's stream, and what a prompt
chunk costs by where it starts (the scheduler's measure of a chunk's work, llm_engine.ATTENTION_EFFICIENCY).

    .venv/bin/python benchmarks/long_prompt.py beside [--prompt-tokens 7000] [server flags...]
    .venv/bin/python benchmarks/long_prompt.py chunks [--chunk 512] [--prompt-tokens 8000]
    .venv/bin/python benchmarks/long_prompt.py ttft --url http://127.0.0.1:8001 [--prompt-tokens 1000 4000 8000]

`beside`: a real server; a streamed chat starts, 1 s after its first token a completion with a prompt of
`--prompt-tokens` ids arrives; prints the prompt's time and the stream's gaps between tokens while it ran (p50 / p99 /
max).
`chunks`: the offline engine prefills one prompt in `--chunk`-token steps, each step timed.
`ttft`: any OpenAI server already running at `--url` (slipstream, or a peer: `benchmarks/peers/vllm.sh serve 8001`)
answers one token to prompts of random ids of each size alone; prints the best of two (no shared prefix to cache).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def beside(prompt_tokens: int, server_flags: list[str]) -> None:
    from server_utils import running_server

    with running_server("--max-model-len", "8192", "--kv-cache-memory", "1GiB", *server_flags) as server:
        arrivals: list[float] = []  # when each of the stream's tokens came
        prompt_done = threading.Event()

        def stream() -> None:  # until the prompt has its answer (a fast machine streams 400 tokens in 3 s)
            body = {"messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 6000,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=900) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        arrivals.append(time.monotonic())
                    if prompt_done.is_set():
                        break

        streaming = threading.Thread(target=stream)
        streaming.start()
        while not arrivals:
            time.sleep(0.05)
        time.sleep(1)
        start = time.monotonic()
        r = httpx.post(f"{server.base_url}/completions", json={"prompt": [1000] * prompt_tokens, "max_tokens": 1},
                       timeout=900)
        end = time.monotonic()
        prompt_done.set()
        streaming.join()
        print(f"{prompt_tokens}-token prompt: {r.status_code} in {end - start:.1f} s")
        during = [t for t in arrivals if start <= t <= end]
        gaps = sorted(b - a for a, b in zip(during, during[1:], strict=False))
        if not gaps:
            print("the stream ended before the prompt was answered: nothing measured")
            return
        print(f"the stream's gaps between tokens while the prompt ran: {len(gaps)} tokens, p50 "
              f"{gaps[len(gaps) // 2]:.3f} s, p99 {gaps[int(len(gaps) * 0.99)]:.2f} s, max {gaps[-1]:.2f} s")


def chunks(chunk: int, prompt_tokens: int) -> None:
    from slipstream import SamplingParams
    from slipstream.config import EngineConfig
    from slipstream.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(max_model_len=8192, max_num_batched_tokens=chunk, kv_cache_memory=1 << 30,
                                    enable_prefix_caching=False))
    random.seed(0)
    engine.add_request("long", [random.randrange(100, 40000) for _ in range(prompt_tokens)],
                       SamplingParams(max_tokens=1, temperature=0))
    for start in range(0, prompt_tokens, chunk):
        t = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t
        per_token_ms = seconds / min(chunk, prompt_tokens - start) * 1e3
        print(f"chunk from {start:5d}: {seconds * 1000:6.0f} ms, {per_token_ms:.2f} ms a token")


def ttft(url: str, sizes: list[int]) -> None:
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    for n in sizes:
        seconds = []
        for attempt in range(2):
            rng = random.Random(n * 10 + attempt)
            body = {"model": model, "prompt": [rng.randrange(1000, 40000) for _ in range(n)], "max_tokens": 1}
            start = time.monotonic()
            httpx.post(f"{url}/v1/completions", json=body, timeout=900).raise_for_status()
            seconds.append(time.monotonic() - start)
        print(f"{n}-token prompt: first token in {min(seconds):.2f} s ({n / min(seconds):.0f} prompt tokens/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["beside", "chunks", "ttft"])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=None, help="(one size but for ttft)")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="ttft: the server's base URL, without /v1")
    args, server_flags = p.parse_known_args()
    if args.what == "beside":
        beside(args.prompt_tokens[0] if args.prompt_tokens else 7000, server_flags)
    elif args.what == "chunks":
        chunks(args.chunk, args.prompt_tokens[0] if args.prompt_tokens else 8000)
    else:
        ttft(args.url, args.prompt_tokens or [1000, 4000, 8000])


if __name__ == "__main__":
    main()
