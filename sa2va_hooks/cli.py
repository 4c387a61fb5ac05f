"""Command line: ``python -m sa2va_hooks verify DIR``.

Exit codes: 0 all well, 1 a problem was found, 2 the command could not run (bad input).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from .core.verify import verify_snapshot


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_snapshot(args.dir)
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {args.dir}: {len(problems)} problem(s)")
        return 1
    print(f"OK: {args.dir}: every tensor, file and the root digest match the manifest")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa2va_hooks", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a snapshot against its export_manifest.json")
    v.add_argument("dir")
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - top of the CLI: report, don't dump a traceback
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
