"""The server's command line: FastDeploy's flags, their defaults, and bad values that stop the start with
a clear one-line message (no traceback), in-process and through the real entry points."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from server_utils import free_port

from slipstream.config import EngineConfig
from slipstream.entrypoints.openai.args import API_KEY_ENV, engine_config, ignored_flags, memory_size, parse_args
from slipstream.model.worker import THREAD_BINDING_ENV, cpu_threads, thread_binding_warning, threads_per_rank

SERVER = [sys.executable, "-m", "slipstream.entrypoints.openai.api_server"]
CLI = [str(Path(sys.executable).parent / "slipstream")]  # the console script


@pytest.mark.parametrize(("text", "size"), [("268435456", 256 << 20), ("256MiB", 256 << 20), ("256Mi", 256 << 20),
                                            ("0.5GiB", 512 << 20), ("300MB", 300_000_000), ("2g", 2_000_000_000)])
def test_memory_sizes(text, size):
    assert memory_size(text) == size


def test_the_seed_command_line_maps_onto_the_engine_config():
    args = parse_args(["--model", "baidu/ERNIE-4.5-0.3B-Paddle", "--port", "8188", "--tensor-parallel-size", "8",
                       "--max-model-len", "32768", "--enable-logprob"])
    config = engine_config(args)
    assert (config.model, config.tensor_parallel_size, config.max_model_len) == ("baidu/ERNIE-4.5-0.3B-Paddle", 8,
                                                                                  32768)
    assert args.port == 8188 and args.enable_logprob


def test_every_engine_flag_reaches_the_config():
    args = parse_args(["--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
                       "--kv-cache-memory", "1GiB", "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
                       "--dtype", "float32", "--device", "cpu", "--seed", "7", "--chat-template", "t.jinja",
                       "--max-logprobs", "5", "--quantization", "w4a8", "--kv-cache-dtype", "float32",
                       "--cpu-threads", "3"])
    config = engine_config(args)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (8, 512, 32)
    assert config.kv_cache_memory == 1 << 30
    assert not config.enable_prefix_caching and not config.enable_chunked_prefill
    assert (config.dtype, config.device, config.seed, config.chat_template, config.max_logprobs) == (
        "float32", "cpu", 7, "t.jinja", 5)
    assert config.quantization == "w4a8" and config.kv_cache_dtype == "float32"
    assert config.cpu_threads == 3


def test_cpu_threads_come_from_the_flag_then_omp_num_threads_then_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(EngineConfig()) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(EngineConfig()) == 1
    assert cpu_threads(EngineConfig(cpu_threads=5)) == 5
    assert threads_per_rank(EngineConfig(cpu_threads=5, tensor_parallel_size=2)) == 2


def test_thread_binding_in_the_environment_is_warned_about(monkeypatch):
    for name in THREAD_BINDING_ENV:
        monkeypatch.delenv(name, raising=False)
    assert thread_binding_warning() is None
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    monkeypatch.setenv("OMP_PLACES", "cores")
    warning = thread_binding_warning()
    assert warning is not None and "OMP_PROC_BIND=close OMP_PLACES=cores" in warning and "unset" in warning
    monkeypatch.setenv("OMP_PROC_BIND", "FALSE")  # binds nothing, whatever the places
    assert thread_binding_warning() is None
    monkeypatch.delenv("OMP_PROC_BIND")
    monkeypatch.delenv("OMP_PLACES")
    monkeypatch.setenv("GOMP_CPU_AFFINITY", "0-1")
    assert "GOMP_CPU_AFFINITY=0-1" in thread_binding_warning()


def test_defaults():
    args = parse_args([])
    assert (args.host, args.port, args.model, args.served_model_name) == ("0.0.0.0", 8188, None, None)
    assert args.max_logprobs == 20 and not args.enable_logprob and args.api_key is None
    config = engine_config(args)
    assert config.enable_prefix_caching and config.enable_chunked_prefill and config.dtype == "auto"
    assert config.quantization is None and config.kv_cache_dtype == "auto"  # exact unless asked


def test_api_keys_repeat_and_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert parse_args(["--api-key", "a", "--api-key", "b"]).api_key == ["a", "b"]
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args([]).api_key == ["from-env"]
    assert parse_args(["--api-key", "flag"]).api_key == ["flag"]  # the flag wins


BAD = [
    (["--port", "abc"], "--port"),
    (["--port", "70000"], "--port"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--max-model-len", "-5"], "--max-model-len"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
    (["--dtype", "float8"], "--dtype"),
    (["--quantization", "int3"], "--quantization"),
    (["--kv-cache-dtype", "int4"], "--kv-cache-dtype"),
    (["--device", "tpu"], "--device"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-waiting-time", "-2"], "--max-waiting-time"),
    (["--log-level", "loud"], "--log-level"),
    (["--reasoning-parser", "nonsense"], "--reasoning-parser"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--workers", "4"], "--workers"),
    (["--max-body-size", "big"], "--max-body-size"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--cpu-threads", "0"], "--cpu-threads"),
    (["--metrics-port", "0"], "--metrics-port"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_stop_with_a_message_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_a_bad_flag_through_the_module_entry_point_is_one_clear_line():
    r = subprocess.run([*SERVER, "--port", "abc"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "argument --port: invalid int value: 'abc'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # (argparse's whole usage text came first: 36 lines)


def test_a_model_that_cannot_load_stops_the_server_with_its_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # found (a Hugging Face directory), but no model in it
    r = subprocess.run([*SERVER, "--port", str(free_port()), "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert "failed to load the model" in r.stderr and "model_type" in r.stderr
    assert "Traceback" not in r.stderr


def imported_torch(stderr: str) -> bool:
    """Whether a `python -X importtime` run imported torch (its lines: "import time: self | cumulative | name")."""
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in stderr.splitlines())


def test_help_a_bad_flag_and_a_missing_model_answer_before_torch_is_imported(tmp_path):
    """They took 5-10 s on 2 cores: the server module imported torch, the engine and FastAPI before it read its
    flags, and a mistyped --model failed only as the engine loaded it, after uvicorn's "Application startup
    complete". Now the command line and the model's files are checked first, with nothing heavy imported."""
    importtime = [sys.executable, "-X", "importtime", *SERVER[1:]]
    r = subprocess.run([*importtime, "--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "--max-model-len" in r.stdout and not imported_torch(r.stderr)
    r = subprocess.run([*importtime, "--max-model-len", "4x"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and not imported_torch(r.stderr)
    r = subprocess.run([*importtime, "--model", str(tmp_path / "missing.gguf")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and not imported_torch(r.stderr), r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and "error: argument --model:" in errors[0] and "missing.gguf" in errors[0], errors
    r = subprocess.run([*SERVER, "--model", str(tmp_path / "missing.gguf")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and imported_torch(r.stderr) is False and "Traceback" not in r.stderr


def test_a_taken_port_stops_the_start_before_loading_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*SERVER, "--host", "127.0.0.1", "--port", str(port)], capture_output=True, text=True,
                           timeout=600)
    assert r.returncode != 0
    assert "Address already in use" in r.stderr and "Traceback" not in r.stderr and "loaded" not in r.stderr


def test_cli_serve_help_documents_every_flag_with_its_default():
    r = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: slipstream serve")
    for flag in ("--model", "--port", "--host", "--tensor-parallel-size", "--max-model-len", "--enable-logprob",
                 "--served-model-name", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                 "--kv-cache-memory", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--enable-chunked-prefill", "--dtype", "--device", "--seed", "--chat-template",
                 "--reasoning-parser", "--api-key", "--max-concurrency", "--max-waiting-time", "--max-logprobs",
                 "--log-level"):
        assert flag in r.stdout, flag
    assert "(default: 8188)" in r.stdout and "(default: 20)" in r.stdout


def test_cli_without_a_command_prints_usage():
    r = subprocess.run(CLI, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "serve" in r.stderr and "bench" in r.stderr


def test_collect_env_reports_this_machine():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_PROC_BIND": "close"}
    env.pop("OMP_PLACES", None)
    r = subprocess.run([*CLI, "collect-env", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    import torch

    assert report["torch version"] == torch.__version__ and report["slipstream version"] == "0.1.0"
    with open("/proc/cpuinfo") as f:
        info = f.read()
    assert report["cpu"] in info and all(f in info for f in report["cpu features"])
    assert report["engine threads"] == 1 and report["OMP_NUM_THREADS"] == "1"  # the environment is honoured
    assert report["OMP_PROC_BIND"] == "close" and report["OMP_PLACES"] == "unset"
    assert report["dtype (auto)"] == "float32" and report["device (auto)"] == "cpu"
    from slipstream.kernels import dispatch

    assert report["compiled CPU kernels"].split()[0].rstrip(":") in {v.name for v in dispatch.VARIANTS} | {"none"}
    assert len(report["cpu kernel variants"]) == len(dispatch.VARIANTS)
    text = subprocess.run([*CLI, "collect-env"], capture_output=True, text=True, timeout=600).stdout
    assert dict(line.split(": ", 1) for line in text.splitlines())["cpu"] == report["cpu"]


def test_vllm_spellings_and_its_flags_that_act_on_nothing_here():
    """vLLM's command lines were refused for a spelling (`--dtype half`, `-tp`, `-q`) or a flag with nothing to act
    on here (`--disable-log-requests`, ...): the spellings mean ours, the flags are accepted and named in the log."""
    args = parse_args(["--dtype", "half", "-tp", "3", "-q", "w4a8", "--disable-log-requests", "--enforce-eager",
                       "--trust-remote-code", "--gpu-memory-utilization", "0.9", "--served-model-name", "a", "b/c"])
    assert (args.dtype, args.tensor_parallel_size, args.quantization) == ("float16", 3, "w4a8")
    assert parse_args(["--dtype", "float"]).dtype == "float32" and args.served_model_name == ["a", "b/c"]
    assert ignored_flags(args) == ["--trust-remote-code", "--enforce-eager", "--gpu-memory-utilization",
                                   "--disable-log-requests / --disable-log-stats"]
    assert ignored_flags(parse_args([])) == []


def test_vllm_and_fastdeploy_command_lines_from_their_quick_starts_parse():
    """`--max-model-len 32k` (vLLM reads counts so), `--kv-cache-dtype fp8`, FastDeploy's queue ports: refused by
    argparse before. fp8 means the int8 cache (no fp8 kernels; the same bytes a row)."""
    args = parse_args(["--model", "baidu/ERNIE-4.5-0.3B-Paddle", "--port", "8180", "--metrics-port", "8181",
                       "--engine-worker-queue-port", "8182", "--max-model-len", "32k", "--max-num-seqs", "32",
                       "--max-num-batched-tokens", "8K", "--kv-cache-dtype", "fp8", "--swap-space", "4",
                       "--load-format", "auto", "--kv-cache-ratio", "0.75", "--tokenizer", "/some/tokenizer"])
    config = engine_config(args)
    assert (config.max_model_len, config.max_num_batched_tokens) == (32_000, 8192)
    assert (config.kv_cache_dtype, config.tokenizer) == ("int8", "/some/tokenizer")
    assert ignored_flags(args) == ["--swap-space", "--load-format", "--engine-worker-queue-port / --cache-queue-port",
                                   "--kv-cache-ratio"]
    assert parse_args(["--max-model-len", "25.6k"]).max_model_len == 25_600
    for bad in ("0", "1.5", "4x", "-4k"):
        with pytest.raises(SystemExit):
            parse_args(["--max-model-len", bad])
