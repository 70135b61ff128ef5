"""Soak: minutes of mixed traffic on one server; its memory, file descriptors and KV blocks must stay flat.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--clients 12] [--kv-cache-memory 512MiB]

Starts a default-model server (--enable-logprob) and runs `--clients` closed-loop clients, each request
drawn at random: chat or completions, streamed or not, n = 1-3, logprobs or not, short or long prompts,
and one in five dropped by its client at a random moment. Every 30 s it samples the server's RSS, open
file descriptors, threads and the engine gauges; at the end, with the load stopped, every request must
have ended and every KV block must be free. The KV cache is allocated up front but its pages are
committed as blocks are first used, so RSS climbs towards its size before it can be flat: keep it small.
Writes benchmarks/results/soak-<time>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from structured_outputs import cpu_name, start_server  # noqa: E402

SHORT = "Tell me about the sea."
LONG = "Summarise this text. " + "Rivers run to the sea and the sea returns as rain over the hills. " * 60


def request(rng: random.Random) -> tuple[str, dict]:
    prompt = LONG if rng.random() < 0.2 else SHORT
    body: dict = {"max_tokens": rng.choice([8, 32, 96]), "n": rng.choice([1, 1, 2, 3]), "stream": rng.random() < 0.6,
                  "temperature": rng.choice([0, 0.8])}
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": prompt}]
        if rng.random() < 0.3:
            body |= {"logprobs": True, "top_logprobs": 3}
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    if rng.random() < 0.3:
        body["logprobs"] = 2
    return "/v1/completions", body


async def client(http: httpx.AsyncClient, rng: random.Random, stop: float, counts: dict[str, int]) -> None:
    while time.monotonic() < stop:
        path, body = request(rng)
        drop_after = rng.uniform(0.05, 3) if rng.random() < 0.2 else None
        try:
            await asyncio.wait_for(send(http, path, body), drop_after)
            counts["completed"] += 1
        except asyncio.TimeoutError:
            counts["dropped"] += 1
        except httpx.HTTPError as exc:
            counts["failed"] += 1
            print(f"request failed: {exc!r}", flush=True)


async def send(http: httpx.AsyncClient, path: str, body: dict) -> None:
    if not body["stream"]:
        (await http.post(path, json=body)).raise_for_status()
        return
    async with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for _ in r.aiter_lines():
            pass


def process_stats(pid: int) -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def engine_gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    wanted = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    return {s.name.removeprefix("slipstream:"): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.removeprefix("slipstream:") in wanted}


async def sampler(url: str, pid: int, stop: float, samples: list[dict]) -> None:
    start = time.monotonic()
    while True:
        samples.append({"t_s": time.monotonic() - start, **process_stats(pid), **engine_gauges(url)})
        print(samples[-1], flush=True)
        if time.monotonic() >= stop:
            return
        await asyncio.sleep(min(30, max(0.0, stop - time.monotonic())))


async def run(url: str, pid: int, args: argparse.Namespace) -> tuple[list[dict], dict[str, int]]:
    stop = time.monotonic() + args.minutes * 60
    counts = {"completed": 0, "dropped": 0, "failed": 0}
    samples: list[dict] = []
    rng = random.Random(9)
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(sampler(url, pid, stop, samples),
                             *(client(http, random.Random(rng.random()), stop, counts) for _ in range(args.clients)))
    return samples, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--port", type=int, default=8198)
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.port, ["--enable-logprob", "--max-model-len", "2048",
                                    "--kv-cache-memory", args.kv_cache_memory])
    try:
        samples, counts = asyncio.run(run(url, proc.pid, args))
        time.sleep(2)  # the last aborts land at the next step
        final = {"t_s": samples[-1]["t_s"] + 2, **process_stats(proc.pid), **engine_gauges(url)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    columns = ["t_s", "rss_mib", "fds", "threads", "num_requests_running", "num_requests_waiting",
               "kv_cache_usage_perc"]
    lines = [f"# Soak ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; default-model server (`--enable-logprob "
             f"--max-model-len 2048 --kv-cache-memory {args.kv_cache_memory}`), {args.clients} closed-loop "
             f"clients for {args.minutes:g} min: chat and completions, streamed or not, n 1-3, logprobs, short "
             "and long prompts, 1 in 5 dropped by its client.",
             "", f"Requests: {counts['completed']} completed, {counts['dropped']} dropped by their clients, "
             f"{counts['failed']} failed.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in [*samples, {**final, "t_s": f"{final['t_s']:.0f} (load stopped)"}]:
        cells = [v if isinstance(v := row[c], str) else f"{v:.3f}" if c == "kv_cache_usage_perc" else f"{v:.0f}"
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    out = ROOT / "results" / f"soak-{time.strftime('%Y%m%d-%H%M')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if final["num_requests_running"] or final["num_requests_waiting"] or final["kv_cache_usage_perc"]:
        raise SystemExit("requests or KV blocks were left behind")


if __name__ == "__main__":
    main()
