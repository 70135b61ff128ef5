"""The server's command: `python -m slipstream.entrypoints.openai.api_server --model M --port 8188` (and `slipstream
serve`). Reads the flags and finds the model's files before importing the server (torch, the engine: seconds), so
`--help`, a bad flag and a mistyped `--model` answer at once; then runs server.py's `serve`."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from slipstream.entrypoints.openai.args import engine_config, parse_args
from slipstream.model.locate import ModelNotFoundError, resolve_model


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    try:
        model_path = resolve_model(args.model)
    except ModelNotFoundError as exc:
        print(f"{prog or Path(sys.argv[0]).name}: error: argument --model: {exc}", file=sys.stderr)
        sys.exit(2)  # (argparse's status for a bad flag)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.node_rank > 0:  # a worker-only node of a multi-node tensor-parallel launch: no HTTP server
        from slipstream.model.worker import run_node_workers

        sys.exit(run_node_workers(engine_config(args)))
    logging.getLogger("slipstream.api_server").info(
        "loading %s (the port answers meanwhile: /health is 503 until the model is up)", model_path)
    from slipstream.entrypoints.openai.server import serve

    try:
        sys.exit(asyncio.run(serve(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
