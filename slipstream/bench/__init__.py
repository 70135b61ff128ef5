"""`slipstream bench throughput` (offline engine) and `slipstream bench serve` (any OpenAI-compatible server)."""

from __future__ import annotations

import argparse

from slipstream.bench import serve, throughput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slipstream bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("throughput", throughput), ("serve", serve)):
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)
