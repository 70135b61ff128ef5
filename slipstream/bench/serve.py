"""Online serving benchmark against any OpenAI-compatible server (slipstream, vLLM, llama.cpp's llama-server).

Streams chat (or text) completions with prompts of about `--input-len` tokens and exactly `--output-len`
output tokens (max_tokens plus the `ignore_eos`/`min_tokens` extras those servers accept), either closed
loop (`--max-concurrency`) or with Poisson arrivals (`--request-rate`), and reports TTFT, TPOT, ITL and
throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from slipstream.bench.report import emit, summarize_ms

logger = logging.getLogger(__name__)

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# Common English words: about one token each in any tokenizer, so a prompt of N of them is about N tokens
# even when no tokenizer is at hand; drawn at random, no two prompts share a cacheable prefix.
_WORDS = tuple(" " + w for w in """
the of and to in is you that it he was for on are as with his they at be this have from or one had by word but
not what all were we when your can said there use an each which she do how their if will up other about out
many then them these so some her would make like him into time has look two more write go see number no way
could people my than first water been call who oil its now find long down day did get come made may part over
new sound take only little work know place year live me back give most very after thing our just name good
sentence man think say great where help through much before line right too mean old any same tell boy follow
came want show also around form three small set put end does another well large must big even such because
turn here why ask went men read need land different home us move try kind hand picture again change off play
spell air away animal house point page letter mother answer found study still learn should world high every
near add food between own below country plant last school father keep tree never start city earth eye light
""".split())


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first content chunk
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)  # seconds between consecutive content chunks


class PromptFactory:
    """Random text prompts of about `n` tokens as the server counts them (chat template included),
    measured with the model's tokenizer when there is one, else counted in words."""

    def __init__(self, tokenizer, chat: bool, seed: int) -> None:
        self.tokenizer = tokenizer
        self.chat = chat and tokenizer is not None and tokenizer.chat_template is not None
        self.rng = random.Random(seed)

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        if self.chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=False)
        else:
            ids = self.tokenizer.encode(text)
        return len(ids)

    def make(self, n: int) -> str:
        words = self.rng.choices(_WORDS, k=n)
        for _ in range(8):  # the template's tokens and multi-token words shift the count: correct and re-measure
            text = "".join(words).lstrip()
            diff = n - self.count(text)
            if diff == 0:
                break
            words = words + self.rng.choices(_WORDS, k=diff) if diff > 0 else words[: max(1, len(words) + diff)]
        return text


def load_prompt_tokenizer(name: str | None):
    """The tokenizer that sizes prompts: `name` as slipstream resolves models (None: the embedded default
    model). Without an explicit name and without the default model, prompts are sized in words."""
    from slipstream.model.loader import ModelNotFoundError, hf_directory, load_tokenizer

    try:
        return load_tokenizer(hf_directory(name))
    except ModelNotFoundError as e:
        if name is not None:
            raise SystemExit(f"--tokenizer: {e}") from e
        logger.warning("%s; sizing prompts in words instead of tokens", e)
        return None


async def _request(client: httpx.AsyncClient, path: str, body: dict) -> RequestResult:
    """One streamed request; timings are taken when each SSE chunk with text arrives."""
    result = RequestResult()
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {chunk['error']}"
                    return result
                if usage := chunk.get("usage"):  # the last one counts (continuous usage puts it on every chunk)
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
                    result.output_tokens = usage.get("completion_tokens") or 0
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
                        now = time.perf_counter()
                        if chunks:
                            result.itls.append(now - last)
                        else:
                            result.ttft = now - start
                        last = now
                        chunks += 1
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks  # servers without usage: one token per chunk
    result.ok = chunks > 0
    if not result.ok:
        result.error = "the stream carried no text"
    return result


def _body(args: argparse.Namespace, model: str, prompt: str) -> dict:
    body = {
        "model": model,
        "max_tokens": args.output_len,
        "min_tokens": args.output_len,
        "ignore_eos": True,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body | args.extra_body


async def _benchmark(args: argparse.Namespace, prompts: list[str], warmup: str) -> tuple[str, list, float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    # trust_env=False: a proxy from the environment would sit between client and server and skew timings.
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=httpx.Timeout(600, connect=10),
                                 limits=limits, trust_env=False) as client:
        model = args.model
        if model is None:
            try:
                response = await client.get("/v1/models")
                response.raise_for_status()
            except httpx.HTTPError as e:
                raise SystemExit(f"cannot list the models of {args.base_url}: {e}") from e
            model = response.json()["data"][0]["id"]
        path = ENDPOINTS[args.endpoint]
        check = await _request(client, path, _body(args, model, warmup))
        if not check.ok:
            raise SystemExit(f"the warm-up request to {args.base_url}{path} failed: {check.error}")

        slots = asyncio.Semaphore(args.max_concurrency or len(prompts))
        gaps = random.Random(args.seed)

        async def limited(prompt: str) -> RequestResult:
            async with slots:
                return await _request(client, path, _body(args, model, prompt))

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(gaps.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return model, results, time.perf_counter() - start


def _prompts(args: argparse.Namespace, factory: PromptFactory) -> list[str]:
    if args.prompt_file is None:
        return [factory.make(args.input_len) for _ in range(args.num_prompts)]
    with open(args.prompt_file) as f:
        given = [line.rstrip("\n") for line in f if line.strip()]
    return [given[i % len(given)] for i in range(args.num_prompts)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8188", help="server URL (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat",
                        help="chat: /v1/chat/completions, completions: /v1/completions (default: chat)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--tokenizer", default=None,
                        help="model whose tokenizer sizes the prompts (default: the embedded default model)")
    parser.add_argument("--prompt-file", default=None,
                        help="given prompts, one per line, used in turn (default: random words)")
    parser.add_argument("--num-prompts", type=int, default=64, help="number of requests (default: 64)")
    parser.add_argument("--input-len", type=int, default=100, help="prompt tokens per request (default: 100)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: 128)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="requests in flight at most: a closed loop (default: unlimited)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default: inf, all at once)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every request body")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    factory = PromptFactory(load_prompt_tokenizer(args.tokenizer), args.endpoint == "chat", args.seed)
    prompts = _prompts(args, factory)
    model, results, duration = asyncio.run(_benchmark(args, prompts, factory.make(args.input_len)))

    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    result = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "num_prompts": len(results),
        "max_concurrency": args.max_concurrency,  # None: unlimited
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else None,  # None: all at once
        "completed": len(done),
        "failed": len(failed),
        "duration_s": duration,
        "input_tokens": input_tokens,  # 0 when the server reports no usage
        "output_tokens": output_tokens,
        "mean_input_tokens": input_tokens / len(done) if done else 0.0,
        "mean_output_tokens": output_tokens / len(done) if done else 0.0,
        "request_per_s": len(done) / duration,
        "output_tok_per_s": output_tokens / duration,
        "total_tok_per_s": (input_tokens + output_tokens) / duration,
        "ttft_ms": summarize_ms([r.ttft for r in done]),
        "tpot_ms": summarize_ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]),
        "itl_ms": summarize_ms([t for r in done for t in r.itls]),
        "e2el_ms": summarize_ms([r.latency for r in done]),
    }
    emit("Serving Benchmark", result, args.json)
    if failed:
        print(f"{len(failed)} request(s) failed; the first: {failed[0].error}", file=sys.stderr)
        return 1
    return 0
