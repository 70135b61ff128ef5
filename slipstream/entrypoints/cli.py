"""The `slipstream` console script: serve, chat, complete, bench, run-batch, collect-env."""

from __future__ import annotations

import sys

USAGE = """usage: slipstream {serve,chat,complete,bench,run-batch,collect-env} ...

  serve        start the OpenAI-compatible server (`slipstream serve --help` for its flags)
  chat         chat with a running server in the terminal (`slipstream chat --url URL`)
  complete     continue a prompt on a running server (`slipstream complete "Once upon a time"`)
  bench        benchmark a server or the offline engine (`slipstream bench --help`)
  run-batch    an OpenAI Batch file through the engine, no server (`slipstream run-batch -i IN -o OUT`)
  collect-env  versions, CPU features, threads, dtype and kernels on this machine (for bug reports)"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    # Imported per command, so one command never pays for (or breaks on) the other's imports.
    if command == "serve":
        from slipstream.entrypoints.openai.api_server import main as serve

        serve(rest, prog="slipstream serve")
    elif command == "bench":
        from slipstream.bench import main as bench

        sys.exit(bench(rest))
    elif command in ("chat", "complete"):
        from slipstream.entrypoints.chat_cli import chat_main, complete_main

        sys.exit((chat_main if command == "chat" else complete_main)(rest))
    elif command == "run-batch":
        from slipstream.entrypoints.run_batch import main as run_batch

        sys.exit(run_batch(rest))
    elif command == "collect-env":
        from slipstream.entrypoints.collect_env import main as collect_env

        sys.exit(collect_env(rest))
    elif command in ("-h", "--help"):
        print(USAGE)
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
