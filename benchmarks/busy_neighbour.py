"""How the server slows down beside CPU-bound neighbours: one request's latency idle, then with one busy
process per core (what a two-job compile does), for each environment given.

    .venv/bin/python benchmarks/busy_neighbour.py [--env '{}' --env '{"GOMP_SPINCOUNT": "300000"}']

Each environment starts its own default-model server; latency is the median of `--repeats` completions of
`--output-len` tokens (ignore_eos, greedy). A fair share of the cores costs about 2x; spinning OpenMP
threads make it far worse. Writes benchmarks/results/busy-neighbour-<time>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from structured_outputs import cpu_name, start_server  # noqa: E402


def latency(port: int, tokens: int) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600, json={
        "prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - t0


def measure(env: dict[str, str], args: argparse.Namespace) -> tuple[float, float]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the server inherits it
    try:
        proc = start_server(args.port, ["--kv-cache-memory", "512MiB"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        latency(args.port, 8)  # warm-up
        idle = statistics.median(latency(args.port, args.output_len) for _ in range(args.repeats))
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
        try:
            time.sleep(1)
            busy = statistics.median(latency(args.port, args.output_len) for _ in range(args.repeats))
        finally:
            for h in hogs:
                h.kill()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return idle, busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", type=json.loads, action="append", help="extra environment of one server (JSON)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--port", type=int, default=8196)
    args = p.parse_args()
    envs = args.env or [{}, {"GOMP_SPINCOUNT": "300000"}]
    lines = [f"# Busy neighbour ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores; default-model server, one completion of "
             f"{args.output_len} tokens, median of {args.repeats}; busy = one `while True: pass` process per core.",
             "", "| server environment | idle (s) | busy (s) | slowdown |", "|---|---|---|---|"]
    for env in envs:
        idle, busy = measure(env, args)
        lines.append(f"| {json.dumps(env) if env else 'default'} | {idle:.2f} | {busy:.2f} | {busy / idle:.1f}x |")
        print(lines[-1], flush=True)
    out = ROOT / "results" / f"busy-neighbour-{time.strftime('%Y%m%d-%H%M')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
