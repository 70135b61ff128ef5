"""The server past what it can serve: how fast /health and /metrics answer while every batch slot is taken
and more requests wait, and what clients over --max-concurrency get.

    .venv/bin/python benchmarks/overload.py [--clients 48] [--max-concurrency 32] [--seconds 20]

Starts a default-model server with `--max-concurrency` and `--max-num-seqs` (the batch; the rest of the
admitted requests wait); `--clients` closed-loop streaming clients (64 output
tokens each, ignore_eos) keep it saturated for `--seconds` while a probe asks /health and /metrics every
100 ms. Clients over the cap get 429 with Retry-After: they count them, wait that long and try again.
Writes benchmarks/results/overload-<time>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from structured_outputs import cpu_name, start_server  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64, "ignore_eos": True,
        "stream": True}


async def client(http: httpx.AsyncClient, stop: float, counts: dict[str, int]) -> None:
    while time.monotonic() < stop:
        async with http.stream("POST", "/v1/chat/completions", json=BODY) as r:
            if r.status_code == 429:
                counts["429"] += 1
                counts["retry_after_missing"] += "retry-after" not in r.headers
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                continue
            r.raise_for_status()
            async for _ in r.aiter_lines():
                pass
            counts["200"] += 1


async def probe(url: str, stop: float, times: dict[str, list[float]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await asyncio.sleep(2)  # let the clients fill the batch
        while time.monotonic() < stop:
            for path, seen in times.items():
                t0 = time.perf_counter()
                (await http.get(path)).raise_for_status()
                seen.append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)


async def run(url: str, clients: int, seconds: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    stop = time.monotonic() + seconds
    times: dict[str, list[float]] = {"/health": [], "/metrics": []}
    counts = {"200": 0, "429": 0, "retry_after_missing": 0}
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(probe(url, stop, times), *(client(http, stop, counts) for _ in range(clients)))
    return times, counts


def ms(values: list[float], q: float) -> str:
    return f"{statistics.quantiles(values, n=100)[q - 1] * 1000:.1f}" if q < 100 else f"{max(values) * 1000:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--port", type=int, default=8197)
    args = p.parse_args()
    proc = start_server(args.port, ["--max-concurrency", str(args.max_concurrency),
                                    "--max-num-seqs", str(args.max_num_seqs)])
    try:
        times, counts = asyncio.run(run(f"http://127.0.0.1:{args.port}", args.clients, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = [f"# Overload ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; default-model server, `--max-concurrency "
             f"{args.max_concurrency} --max-num-seqs {args.max_num_seqs}`, {args.clients} closed-loop streaming "
             f"clients of 64 output tokens for {args.seconds:.0f} s.", "",
             f"Requests served: {counts['200']}; answered 429: {counts['429']} "
             f"(without Retry-After: {counts['retry_after_missing']}).", "",
             "| probe | n | p50 (ms) | p99 (ms) | max (ms) |", "|---|---|---|---|---|"]
    for path, seen in times.items():
        lines.append(f"| GET {path} | {len(seen)} | {ms(seen, 50)} | {ms(seen, 99)} | {ms(seen, 100)} |")
    out = ROOT / "results" / f"overload-{time.strftime('%Y%m%d-%H%M')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
