"""`slipstream chat` and `slipstream complete`: a terminal client for a running server (vLLM's commands).

    slipstream chat [--url http://127.0.0.1:8188/v1] [--system TEXT]   # /clear, /exit (or Ctrl-D)
    slipstream complete [--url ...] [--max-tokens N] PROMPT

Answers stream as they are generated; chat keeps the conversation until /clear. Uses the official
`openai` client, so what works here works from any OpenAI client.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai

DEFAULT_URL = "http://127.0.0.1:8188/v1"


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="the server's OpenAI base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("SLIPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer key (default: $SLIPSTREAM_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=None)
    return p


def _connect(args: argparse.Namespace) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key or "unused", max_retries=1, timeout=600)
    model = args.model or client.models.list().data[0].id
    return client, model


def _explain(exc: openai.APIError, url: str) -> str:
    if isinstance(exc, openai.APIConnectionError):  # (the client's own message is only "Connection error.")
        return f"cannot reach a server at {url}: start one with `slipstream serve` (or `make serve`), or pass --url"
    return f"error: {exc}"


def _sampling(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}


def chat_main(argv: list[str] | None = None) -> int:
    p = _parser("slipstream chat")
    p.add_argument("--system", default=None, help="a system prompt opening every conversation")
    args = p.parse_args(argv)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        client, model = _connect(args)
    except openai.APIError as exc:
        print(_explain(exc, args.url), file=sys.stderr)
        return 1
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    print(f"chatting with {model} at {args.url}; /clear starts over, /exit (or Ctrl-D) leaves")
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/clear":
            messages = list(opening)
            print("(conversation cleared)")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = _stream(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                            **_sampling(args)), chat=True)
        except openai.APIError as exc:
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            messages.pop()
            print()
            continue
        messages.append({"role": "assistant", "content": answer})


def complete_main(argv: list[str] | None = None) -> int:
    p = _parser("slipstream complete")
    p.add_argument("prompt", help="the text to continue")
    args = p.parse_args(argv)
    try:
        client, model = _connect(args)
        _stream(client.completions.create(model=model, prompt=args.prompt, stream=True, **_sampling(args)),
                chat=False)
    except openai.APIError as exc:
        print(_explain(exc, args.url), file=sys.stderr)
        return 1
    return 0


def _stream(chunks, chat: bool) -> str:
    """Print the answer as it arrives; returns it whole."""
    parts = []
    for chunk in chunks:
        for choice in chunk.choices:
            piece = (choice.delta.content if chat else choice.text) or ""
            parts.append(piece)
            print(piece, end="", flush=True)
    print()
    return "".join(parts)
