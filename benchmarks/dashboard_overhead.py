"""What the dashboard costs the engine: mean step time and the recorder's own share of it, with no viewer and
with ten viewers on the event stream, and serving throughput against a server started with --disable-dashboard.

    .venv/bin/python benchmarks/dashboard_overhead.py [--concurrency 8] [--num-prompts 32] [--rounds 2]

Each phase is one `slipstream bench serve` run (streamed chat, 64 prompt / 64 output tokens, closed loop); the
phases alternate (none, viewers, none, viewers, ...) so that drift hits both alike. Step figures come from the
recorder's running totals (/v1/engine/stats: steps, busy_s, recorder_s) read before and after each phase.
Writes benchmarks/results/dashboard-overhead-<time>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from structured_outputs import cpu_name, start_server  # noqa: E402

VIEWERS = 10
SERVER_FLAGS = ["--kv-cache-memory", "512MiB"]


def bench(url: str, concurrency: int, num_prompts: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "slipstream.entrypoints.cli", "bench", "serve", "--base-url", url,
                          "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
                          "--input-len", "64", "--output-len", "64", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def steps(url: str) -> dict:
    return httpx.get(f"{url}/v1/engine/stats", timeout=30).json()["recorder"]["steps"]


def viewers(url: str, stop: threading.Event) -> list[threading.Thread]:
    def view() -> None:
        with httpx.stream("GET", f"{url}/v1/engine/stream", timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=view, daemon=True) for _ in range(VIEWERS)]
    for t in threads:
        t.start()
    return threads


def phase(url: str, args: argparse.Namespace, with_viewers: bool, recorded: bool) -> dict:
    stop = threading.Event()
    threads = viewers(url, stop) if with_viewers else []
    before = steps(url) if recorded else None
    result = bench(url, args.concurrency, args.num_prompts)
    row = {"tok_s": result["output_tok_per_s"], "itl_p50": result["itl_ms"]["p50"]}
    if recorded:
        after = steps(url)
        n = after["total"] - before["total"]
        busy, rec = after["busy_s"] - before["busy_s"], after["recorder_s"] - before["recorder_s"]
        row.update(steps=n, step_ms=1000 * busy / n, recorder_perc=100 * rec / busy)
    stop.set()
    for t in threads:
        t.join(timeout=5)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8196)
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    rows: dict[str, list[dict]] = {"dashboard, no viewer": [], f"dashboard, {VIEWERS} viewers": [],
                                   "--disable-dashboard": []}
    proc = start_server(args.port, SERVER_FLAGS)
    try:
        bench(url, args.concurrency, args.concurrency)  # warm up
        for _ in range(args.rounds):
            rows["dashboard, no viewer"].append(phase(url, args, False, True))
            rows[f"dashboard, {VIEWERS} viewers"].append(phase(url, args, True, True))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    proc = start_server(args.port, [*SERVER_FLAGS, "--disable-dashboard"])
    try:
        bench(url, args.concurrency, args.concurrency)
        for _ in range(args.rounds):
            rows["--disable-dashboard"].append(phase(url, args, False, False))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def mean(rs: list[dict], key: str) -> str:
        values = [r[key] for r in rs if key in r]
        return f"{statistics.mean(values):.{3 if key == 'recorder_perc' else 1}f}" if values else "–"

    lines = [f"# Dashboard overhead ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; default-model server ({' '.join(SERVER_FLAGS)}), "
             f"`slipstream bench serve` C={args.concurrency}, {args.num_prompts} prompts of 64 tokens, 64 output "
             f"tokens; {args.rounds} alternating rounds per phase, means shown.", "",
             "| phase | output tok/s | ITL p50 (ms) | steps | mean step (ms) | recorder share of step time (%) |",
             "|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | {mean(rs, 'tok_s')} | {mean(rs, 'itl_p50')} | {mean(rs, 'steps')} | "
                     f"{mean(rs, 'step_ms')} | {mean(rs, 'recorder_perc')} |")
    out = ROOT / "results" / f"dashboard-overhead-{time.strftime('%Y%m%d-%H%M')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
