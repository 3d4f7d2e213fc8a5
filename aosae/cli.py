"""The `aosae` command line: `aosae info | train | eval | ablate ...`.

Each subcommand lives in aosae/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func=main(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("info", "train", "eval", "ablate", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aosae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"aosae.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"aosae.commands.{name}":
                continue  # a subcommand not shipped in this version
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
