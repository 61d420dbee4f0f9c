"""The ``pfkernels`` command.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its arguments and sets
``func``; the function it sets runs it and returns an exit code. ``main`` wires them up.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what the compiled extension provides on this machine")
    p.add_argument("--json", action="store_true", help="print the backend info as JSON")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from . import backend_info

    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {value}")
    return 0


_COMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfkernels",
        description="Curvature of training made cheap to see: sharpness tracking, the principal "
        "flow, central flows and DAL.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
