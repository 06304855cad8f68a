"""The ``bitvit`` command line: one subcommand per job, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from bitvit import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitvit", description="Train, study and deploy ternary and binary Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"bitvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    del sub  # subcommands are added below as they land
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
