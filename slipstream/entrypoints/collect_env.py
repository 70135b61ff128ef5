"""`slipstream collect-env`: what a bug report needs (vLLM's and FastDeploy's command name).

Versions, the CPU and the features the kernels care about, the threads the engine would use, what
`--dtype auto` and the compiled kernels come to on this machine, and the GPU if any. One `key: value`
per line, or `--json`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform

PACKAGES = ("slipstream", "torch", "transformers", "tokenizers", "xgrammar", "gguf", "fastapi", "uvicorn",
            "pydantic", "openai", "prometheus_client", "numpy")
# CPU features that decide which kernels can run (and that the issue tracker asks about).
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("unknown", "", platform.machine()):
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def _kernels(dispatch) -> str:
    try:
        return dispatch.kernels().describe()
    except ValueError as exc:  # (a bad $SLIPSTREAM_CPU_ISA: the report is for such cases too)
        return f"none: {exc}"


def collect() -> dict[str, object]:
    import torch

    from slipstream.config import EngineConfig
    from slipstream.kernels import dispatch
    from slipstream.model.runner import resolve_device, resolve_dtype
    from slipstream.model.worker import THREAD_BINDING_ENV, cpu_threads

    cpu, flags = _cpuinfo()
    device = resolve_device("auto")
    env: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{f"{p} version": _version(p) for p in PACKAGES},
        "cpu": cpu,
        "cpu features": [f for f in CPU_FEATURES if f in flags],
        "cpu cores (machine / usable)": f"{os.cpu_count()} / {len(os.sched_getaffinity(0))}",
        "engine threads": cpu_threads(EngineConfig()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "unset"),
        **{name: os.environ.get(name, "unset") for name in THREAD_BINDING_ENV},
        "device (auto)": str(device),
        "dtype (auto)": str(resolve_dtype("auto", device)).removeprefix("torch."),
        "cpu kernel variants": [f"{v.name}" + (f" (lacks {'+'.join(m)})" if (m := dispatch.missing_features(v))
                                                else "") for v in dispatch.VARIANTS],
        dispatch.ISA_ENV: os.environ.get(dispatch.ISA_ENV, "unset"),
        "compiled CPU kernels": _kernels(dispatch),
        "cuda": torch.version.cuda or "none",
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
    }
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slipstream collect-env", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of key: value lines")
    args = p.parse_args(argv)
    env = collect()
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print("\n".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in env.items()))
    return 0
