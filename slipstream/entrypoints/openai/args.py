"""The server's command line (FastDeploy's flag names). Bad values stop the start with argparse's
one-line error, never a traceback. Imports nothing heavy, so `--help` and mistakes answer at once."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import NoReturn

from slipstream.config import (
    KV_CACHE_DTYPE_ALIASES,
    KV_CACHE_DTYPES,
    QUANTIZATION_ALIASES,
    QUANTIZATION_METHODS,
    EngineConfig,
    SpeculativeConfig,
)
from slipstream.model.locate import DEFAULT_MODEL_FILE
from slipstream.reasoning import REASONING_PARSERS, get_reasoning_parser

API_KEY_ENV = "SLIPSTREAM_API_KEY"

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30}


def memory_size(text: str) -> int:
    """Bytes from '268435456', '256MiB', '256Mi', '0.5GiB', '300MB' (KiB/MiB/GiB binary, KB/MB/GB decimal)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use bytes or a size like 256MiB or 2GiB")
    return int(float(m.group(1)) * unit)


_COUNT_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def token_count(text: str) -> int:
    """A count of tokens as vLLM reads one: 4096, or 4k / 25.6k / 1m (decimal), 4K / 1M (binary: 4096, 2**20)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", text)
    value = m and float(m.group(1)) * _COUNT_UNITS.get(m.group(2), 1)
    if not value or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use a positive whole number like 4096, 4k or 4K")
    return int(value)


def _bounded(kind: type, low: float | None = None, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {bounds}")
        return value

    return parse


def speculative_config(text: str) -> SpeculativeConfig | str | None:
    if text.strip() == "auto":
        return "auto"
    if text.strip() == "null":  # no speculation
        return None
    try:
        return SpeculativeConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{exc} (for example: '{{\"method\": \"ngram\", "
                                         f"\"num_speculative_tokens\": 3}}')") from None


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


class _OneLineErrors(argparse.ArgumentParser):
    """A mistake is one line (argparse printed the whole usage first: some 36 lines above the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def make_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = _OneLineErrors(prog=prog, description="OpenAI-compatible LLM server.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    pos_int = _bounded(int, 1)
    add("--model", default=None, help="a .gguf file or a Hugging Face model directory; default: the embedded "
        "SmolLM2-135M-Instruct")
    add("--tokenizer", default=None, help="the tokenizer's directory or cached repo id, when not the model's own "
        "(vLLM's flag)")
    add("--served-model-name", nargs="+", default=None, help="the model's names in the API (vLLM's: the first "
        "one in responses); when set, requests naming another model get 404 (default: any name is accepted, "
        "/v1/models shows the model's file name)")
    add("--host", default="0.0.0.0", help="address to listen on")
    add("--port", type=_bounded(int, 1, 65535), default=8188, help="port to listen on")
    add("--tensor-parallel-size", "-tp", type=pos_int, default=1, help="number of tensor-parallel ranks")
    add("--nnodes", type=pos_int, default=1, help="machines the tensor-parallel ranks are spread over")
    add("--node-rank", type=_bounded(int, 0), default=0,
        help="this machine's index; node 0 serves HTTP, the others run tensor-parallel workers only")
    add("--master-addr", default="127.0.0.1", help="address of node 0 for the tensor-parallel rendezvous")
    add("--master-port", type=_bounded(int, 1, 65535), default=None,
        help="port of the tensor-parallel rendezvous on node 0 (required with --nnodes > 1; default: a free port)")
    add("--max-model-len", type=token_count, default=None,
        help="context length (prompt + output); capped to the model's trained context")
    add("--max-num-seqs", type=pos_int, default=64, help="most sequences in one batch")
    add("--max-num-batched-tokens", type=token_count, default=None,
        help="token budget of one engine step (default: 512 on a CPU, 2048 on CUDA)")
    add("--block-size", type=pos_int, default=16, help="tokens per KV-cache block")
    add("--kv-cache-memory", type=memory_size, default=None,
        help="KV-cache budget: bytes or a size like 256MiB or 2GiB (default: a quarter of free memory)")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="reuse the KV cache of shared prompt prefixes")
    add("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
        help="split long prompts across engine steps")
    add("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
        type=lambda name: {"half": "float16", "float": "float32"}.get(name, name),  # (vLLM's spellings too)
        help="weights and activations type (auto: float32 on every device, exact and the compiled kernels' type; "
        "bfloat16 / float16: rounded, faster on CUDA; on a CPU with the kernels, weights rounded to it and kept so, "
        "activations in float32)")
    add("--kv-cache-dtype", choices=[*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES], default="auto",
        help="KV-cache type (auto: the model's dtype; float16 with --quantization w4a8, as llama.cpp keeps it, and "
        "with half-precision weights on a CPU; int8: rounded, a scale per token and head, ~half float16's bytes; "
        "vLLM's fp8 / fp8_e4m3 / fp8_e5m2 mean int8: the same bytes, rounded less)")
    add("--quantization", "-q", choices=[*QUANTIZATION_METHODS, *QUANTIZATION_ALIASES], default=None,
        help="w4a8: multiply a GGUF's 4-bit weight blocks with activations rounded to int8 (as llama.cpp "
        "does): faster on CPU, no longer token-for-token equal to the reference. wint8 / wint4 (weight_only_int8 / "
        "_int4): round each linear layer's weights to 8 / 4 bits in blocks of 32 at load, activations stay float32: "
        "less memory (default: exact)")
    add("--speculative-config", type=speculative_config, default="auto",
        help="vLLM's JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": 3, \"prompt_lookup_max\": 3, "
        "\"prompt_lookup_min\": 2, \"disable_by_batch_size\": 2, \"lookup_recent_outputs\": 32}: requests guess "
        "their next tokens from their own context (else from the last finished requests' outputs) and check the "
        "guesses in the same step (the same greedy output, sampled draws of the same "
        "distribution, fewer steps at small batches); null: no guessing. Default: auto, the defaults while one "
        "sequence runs, on one rank's CPU kernels (where guessing changes no output)")
    add("--cpu-threads", type=pos_int, default=None,
        help="compute threads (split among tensor-parallel ranks); default: $OMP_NUM_THREADS if set, else the "
        "cores this process may run on")
    add("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    add("--seed", type=int, default=0, help="global random seed")
    add("--chat-template", default=None, help="chat template (a file or the Jinja text) replacing the model's")
    add("--trust-request-chat-template", action="store_true",
        help="let requests bring their own chat_template (vLLM's flag; a template is code: even sandboxed, one line "
        "can take seconds of CPU and gigabytes of memory); default: refused with a 400")
    add("--reasoning-parser", default=None, help="split thinking models' output into reasoning_content and "
        f"content: {', '.join(sorted(REASONING_PARSERS))}")
    add("--tool-call-parser", default=None, help="read tool calls out of the model's text for tool_choice=auto "
        "(hermes, llama3_json, ernie-x1, ernie-45); without it, auto answers are plain text")
    add("--enable-auto-tool-choice", action="store_true",
        help="vLLM's flag: tool_choice=auto parses calls with --tool-call-parser (which it needs)")
    add("--enable-logprob", action="store_true", help="allow requests for logprobs")
    add("--max-logprobs", type=_bounded(int, 0), default=20, help="most top logprobs a request may ask for")
    add("--api-key", action="append", default=None,
        help=f"accepted bearer key for /v1/* (repeatable; default: ${API_KEY_ENV} if set, else no auth)")
    add("--allowed-origins", action="append", default=None, metavar="ORIGIN",
        help="origin a browser page may call the API from (repeatable; '*' for any); default: none (CORS off)")
    add("--max-concurrency", type=pos_int, default=512, help="most generation requests in flight; beyond, 429")
    add("--max-waiting-time", type=_bounded(float, -1), default=0.0,
        help="seconds a request over --max-concurrency waits for a slot before its 429 (-1: no limit)")
    add("--metrics-port", type=_bounded(int, 1, 65535), default=None,
        help="also serve /metrics on this port (FastDeploy's flag); it stays on --port too")
    add("--workers", type=pos_int, default=1,
        help="API processes (FastDeploy's flag): one, in front of the one engine; its asyncio loop is not the "
        "bottleneck")
    add("--send-timeout", type=_bounded(float, 0.001), default=60.0,
        help="seconds a generation response may wait on a client that takes none of it (a stream nobody reads); "
        "then it ends, and its engine requests and --max-concurrency slot with it")
    add("--max-body-size", type=memory_size, default="16MiB",
        help="largest request body (bytes or a size like 16MiB); larger ones get a 413")
    add("--shutdown-timeout", "--timeout-graceful-shutdown", type=_bounded(float, 0), default=25.0,
        help="seconds a SIGTERM lets requests in flight finish (new ones get 503) before ending them (25: the "
        "exit then comes within Kubernetes' default 30 s grace period)")
    add("--disable-dashboard", action="store_true",
        help="no /dashboard, no /v1/engine/* and no engine recorder behind them")
    add("--dashboard-show-prompts", action="store_true",
        help="the dashboard's request timelines show prompt text (default: only counts and settings)")
    add("--log-level", choices=["debug", "info", "warning", "error", "critical"], default="info",
        help="logging verbosity")
    # vLLM's and FastDeploy's flags that have nothing to act on here, accepted so that their command lines start (and
    # logged as such)
    add("--trust-remote-code", action="store_true",
        help="vLLM's flag: accepted, no effect (no code from a checkpoint runs: the architectures are slipstream's)")
    add("--enforce-eager", action="store_true", help="vLLM's flag: accepted, no effect (no graphs are captured)")
    add("--gpu-memory-utilization", type=_bounded(float, 0.0, 1.0), default=None,
        help="vLLM's flag: accepted, not used (the KV cache's budget is --kv-cache-memory)")
    add("--disable-log-requests", "--disable-log-stats", action="store_true", dest="disable_vllm_logs",
        help="vLLM's flags: accepted, no effect (requests are not logged one by one; stats are on /metrics)")
    add("--swap-space", type=_bounded(float, 0), default=None,
        help="vLLM's flag: accepted, not used (no KV blocks are swapped out: a preempted request is recomputed)")
    add("--load-format", default=None, help="vLLM's flag: accepted, not used (the format is read off the files)")
    # FastDeploy's, from its quick start's command line: ports and shares of its multi-process engine
    add("--engine-worker-queue-port", "--cache-queue-port", type=_bounded(int, 1, 65535), default=None,
        dest="fastdeploy_queue_port", help="FastDeploy's flags: accepted, not used (the engine runs in this process)")
    add("--kv-cache-ratio", type=_bounded(float, 0.0, 1.0), default=None,
        help="FastDeploy's flag: accepted, not used (prompts and outputs share the KV cache's blocks)")
    return p


def served_model_name(args: argparse.Namespace) -> str:
    return (args.served_model_name or [args.model or Path(DEFAULT_MODEL_FILE).stem])[0]


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """The vLLM and FastDeploy flags given that have nothing to act on here, for a line in the start-up log."""
    given = {"--trust-remote-code": args.trust_remote_code, "--enforce-eager": args.enforce_eager,
             "--gpu-memory-utilization": args.gpu_memory_utilization is not None,
             "--disable-log-requests / --disable-log-stats": args.disable_vllm_logs,
             "--swap-space": args.swap_space is not None, "--load-format": args.load_format is not None,
             "--engine-worker-queue-port / --cache-queue-port": args.fastdeploy_queue_port is not None,
             "--kv-cache-ratio": args.kv_cache_ratio is not None}
    return [flag for flag, on in given.items() if on]


def parse_args(argv: list[str] | None = None, prog: str | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The flags of `argv`, checked across flags; `parser`: make_arg_parser's, with flags of its own added."""
    parser = parser or make_arg_parser(prog)
    args = parser.parse_args(argv)
    if args.reasoning_parser is not None:
        try:
            get_reasoning_parser(args.reasoning_parser)
        except ValueError as exc:
            parser.error(f"argument --reasoning-parser: {exc}")
    if args.tool_call_parser is not None:
        from slipstream.tools import get_tool_parser

        try:
            get_tool_parser(args.tool_call_parser)
        except ValueError as exc:
            parser.error(f"argument --tool-call-parser: {exc}")
    elif args.enable_auto_tool_choice:
        parser.error("argument --enable-auto-tool-choice: needs --tool-call-parser")
    if args.workers > 1:
        parser.error(f"argument --workers: slipstream serves from one process ({args.workers} asked): one asyncio "
                     "API loop in front of one engine does not limit throughput; run more servers behind a "
                     "load balancer to scale out")
    if args.node_rank >= args.nnodes:
        parser.error(f"argument --node-rank: {args.node_rank} must be below --nnodes {args.nnodes}")
    if args.nnodes > 1 and args.master_port is None:
        parser.error("argument --master-port: required with --nnodes > 1")
    if args.tensor_parallel_size % args.nnodes:
        parser.error(f"argument --tensor-parallel-size: {args.tensor_parallel_size} is not a multiple of "
                     f"--nnodes {args.nnodes}")
    if args.api_key is None and os.environ.get(API_KEY_ENV):
        args.api_key = [os.environ[API_KEY_ENV]]
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        split_prompt_bursts=True,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        tensor_parallel_size=args.tensor_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        seed=args.seed,
        chat_template=args.chat_template,
        max_logprobs=args.max_logprobs,
        cpu_threads=args.cpu_threads,
        speculative_config=args.speculative_config,
        enable_recorder=not args.disable_dashboard,
        recorder_keeps_prompts=args.dashboard_show_prompts and not args.disable_dashboard,
    )
