"""The `kvmkit` command line: one module per subcommand (kvmtool's layout).

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvmkit import __version__
from kvmkit.errors import UserError

# Subcommand modules, in the order `kvmkit --help` lists them.
SUBCOMMANDS = ("run", "restore", "migrate", "ctl", "serve", "probe", "demo", "lane", "image", "net")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmkit", description="A virtual machine monitor and KVM toolkit."
    )
    parser.add_argument("--version", action="version", version=f"kvmkit {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"kvmkit.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = func(args)
    except UserError as exc:
        print(f"kvmkit {args.subcommand}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"kvmkit {args.subcommand}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
