#!/usr/bin/env python3
"""Side-by-side serving benchmark of slipstream and its peers under the same load (issue 6).

For each server: `benchmarks/peers/<name>.sh serve PORT` starts it on 127.0.0.1, the time until
/v1/models answers is its start-up time, then `slipstream bench serve` runs at each concurrency
(closed loop, `--rounds` rounds with different prompts, the median of each figure kept) and the
server is stopped; with `--alternate`, round by round (all servers in round 1, then in round 2, ...), so that the
VM's speed drifting over the run weighs on every server alike. Writes benchmarks/results/compare-<timestamp>.{md,json}.

Run it with slipstream's venv on an otherwise idle machine, after `benchmarks/peers/<name>.sh install`:
    .venv/bin/python benchmarks/compare.py [--servers slipstream slipstream-w4a8 vllm llama-server]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
PEERS = ROOT / "peers"
SERVERS = ("slipstream", "slipstream-w4a8", "vllm", "llama-server")  # the default run
# On request: --dtype bfloat16 (beside vLLM on a bf16 checkpoint); w4a8 with an int8 KV cache, and with n-gram
# speculation too.
OTHER_SERVERS = ("slipstream-bf16", "slipstream-w4a8-kv8", "slipstream-w4a8-kv8-ngram")
# The figures kept per level: (label, path in the bench serve JSON).
FIGURES = {
    "output_tok_per_s": ("output_tok_per_s",),
    "request_per_s": ("request_per_s",),
    "ttft_p50_ms": ("ttft_ms", "p50"),
    "ttft_p99_ms": ("ttft_ms", "p99"),
    "itl_p50_ms": ("itl_ms", "p50"),
    "itl_p99_ms": ("itl_ms", "p99"),
    "tpot_mean_ms": ("tpot_ms", "mean"),
}


def start(name: str, port: int, timeout: float, log: Path) -> tuple[subprocess.Popen, float]:
    """Starts a peer in its own process group; returns it with its seconds to readiness."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(PEERS / f"{name}.sh"), "serve", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} (not installed? see {log})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2, trust_env=False).status_code == 200:
                return proc, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{name} was not ready after {timeout:.0f} s (see {log})")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def tree_peak_rss_mib(pid: int) -> float:
    """Sum of the peak resident memory (VmHWM) of a process and all its descendants (vLLM forks workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total / 1024


def bench_args(url: str, concurrency: object, num_prompts: object, seed: object, args: argparse.Namespace) -> list[str]:
    """Arguments of `slipstream bench serve` for one round (placeholders allowed, for the report)."""
    return ["serve", "--base-url", url, "--json", "--max-concurrency", str(concurrency),
            "--num-prompts", str(num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--seed", str(seed)]


def bench(bench_serve_args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "slipstream.bench", *bench_serve_args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def figure(result: dict, path: tuple[str, ...]) -> float:
    for key in path:
        result = result[key]
    return result


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    simd = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu} ({simd}), {os.cpu_count()} cores, {mem:.0f} GiB, {platform.platform()}"


PEER_SETTINGS = ("GGUF", "DTYPE")


def markdown(report: dict) -> str:
    names = [n for n in report["servers"] if "levels" in report["servers"][n]]
    ours = [n for n in names if n.startswith("slipstream")]
    peers = [n for n in names if n not in ours]
    lines = [
        f"# Serving comparison, {report['date']}",
        "",
        f"- Machine: {report['machine']}",
        f"- slipstream commit: {report['commit']}",
        f"- Model: {report.get('model') or 'the embedded SmolLM2-135M-Instruct Q4_1 GGUF'}",
        f"- Load: streamed chat completions, ~{report['input_len']} prompt tokens, exactly {report['output_len']} "
        f"output tokens, closed loop at concurrency C, median of {report['rounds']} rounds (different prompts"
        f"{'; the servers alternated round by round' if report.get('alternate') else ''}).",
        f"- Reproduce: `{report['command']}`; each level runs `{report['bench_command']}`.",
        "",
        "Output tokens/s (TTFT p50, ITL p50):",
        "",
        "| C | " + " | ".join(names) + "".join(f" | {o} / {p}" for o in ours for p in peers) + " |",
        "|---" * (1 + len(names) + len(ours) * len(peers)) + "|",
    ]
    for c in report["concurrency"]:
        row = [str(c)]
        for n in names:
            f = report["servers"][n]["levels"][str(c)]
            row.append(f"{f['output_tok_per_s']:.0f} ({f['ttft_p50_ms']:.0f} ms, {f['itl_p50_ms']:.1f} ms)")
        tok_s = {n: report["servers"][n]["levels"][str(c)]["output_tok_per_s"] for n in names}
        row += [f"{tok_s[o] / tok_s[p]:.2f}x" for o in ours for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| server | ready after start | peak RSS (process tree) |", "|---|---|---|"]
    for n, s in report["servers"].items():
        if "error" in s:
            lines.append(f"| {n} | not measured: {s['error'].splitlines()[0]} | |")
        else:
            lines.append(f"| {n} | {s['ready_s']:.1f} s | {s['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=SERVERS + OTHER_SERVERS, default=list(SERVERS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alternate", action="store_true",
                        help="run the servers round by round (each restarted per round) instead of one after another")
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompts-per-slot", type=int, default=4,
                        help="requests per level = this x concurrency, at least 8 (default: 4)")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    # llama-server's slots hold this many tokens each (its default 512 is for ~100 prompt + 128 output tokens; the
    # chat template adds a few dozen)
    os.environ.setdefault("SLOT_TOKENS", str(max(512, -(-(args.input_len + args.output_len + 128) // 256) * 256)))

    url = f"http://127.0.0.1:{args.port}"
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    placeholders = bench_args(url, "C", f"max(8,{args.prompts_per_slot}C)", "1000C+round", args)
    report = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "commit": commit,
              "model": os.environ.get("GGUF"),  # (the peers' $GGUF: benchmarks/peers/common.sh)
              # (with the peer scripts' settings: $GGUF, and $DTYPE for vLLM, benchmarks/peers/)
              "command": shlex.join([*(f"{k}={os.environ[k]}" for k in PEER_SETTINGS if k in os.environ), "python",
                                     "benchmarks/compare.py", *sys.argv[1:]]),
              "bench_command": shlex.join(["slipstream", "bench", *placeholders]),
              "input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds,
              "alternate": args.alternate,
              "concurrency": args.concurrency, "servers": {}}
    if any(name.startswith("slipstream") for name in args.servers):
        from slipstream.kernels import kernels

        kernels()  # built here (once per code change): no server's start-up time or peak RSS counts the compiler
    # Who runs when: each server for all its rounds in turn, or (--alternate) round by round, every server restarted
    # in each, so that the VM's drift over the run (20-35 % within the hour) falls on all of them alike.
    rounds = range(args.rounds)
    turns = [(n, [r]) for r in rounds for n in args.servers] if args.alternate else [(n, rounds) for n in args.servers]
    for name, turn_rounds in turns:
        if "error" in report["servers"].get(name, {}):
            continue
        log = Path(tempfile.gettempdir()) / f"slipstream-compare-{name}.log"
        print(f"{name}: starting (log: {log})", file=sys.stderr)
        try:
            proc, ready_s = start(name, args.port, args.startup_timeout, log)
        except RuntimeError as e:
            print(f"{name}: {e}", file=sys.stderr)
            report["servers"][name] = {"error": str(e)}
            continue
        entry = report["servers"].setdefault(name, {"ready_s": ready_s, "levels": {}, "rounds": {}})
        try:
            for c in args.concurrency:
                num_prompts = max(8, args.prompts_per_slot * c)
                # A new seed per round and level: no server may answer from a prefix cached by an earlier round.
                runs = entry["rounds"].setdefault(str(c), [])
                runs += [bench(bench_args(url, c, num_prompts, 1000 * c + r, args)) for r in turn_rounds]
                entry["levels"][str(c)] = {k: statistics.median(figure(x, p) for x in runs) for k, p in FIGURES.items()}
                print(f"{name} C={c}: {entry['levels'][str(c)]}", file=sys.stderr)
            entry["peak_rss_mib"] = max(entry.get("peak_rss_mib", 0), tree_peak_rss_mib(proc.pid))
        except RuntimeError as e:
            print(f"{name}: {e}", file=sys.stderr)
            report["servers"][name] = {"error": str(e), "ready_s": ready_s}
        finally:
            stop(proc)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"compare-{datetime.now():%Y%m%d-%H%M}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
