"""What both benchmarks share: latency summaries and the two output formats (text, JSON)."""

from __future__ import annotations

import json
import resource
import sys

import numpy as np


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """mean / p50 / p99 of latencies given in seconds, in milliseconds (zeros when there are none)."""
    if not seconds:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ms = np.asarray(seconds) * 1000
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lines(result: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            rows += _lines(value, f"{prefix}{key} ")
        else:
            rows.append((prefix + key, f"{value:.2f}" if isinstance(value, float) else str(value)))
    return rows


def emit(title: str, result: dict, as_json: bool) -> None:
    """Prints `result` to stdout: one JSON object, or an aligned `name: value` table."""
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    rows = _lines(result)
    width = max(len(name) for name, _ in rows) + 2
    print(f" {title} ".center(width + 20, "="))
    for name, value in rows:
        print(f"{name + ':':<{width}}{value}")
