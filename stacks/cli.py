"""``dlstack``: the one command-line entry point.

Each subcommand lives in the module that owns the feature; the module exposes
``register(subparsers)`` and keeps heavy imports (torch, pulumi) inside its handlers
so that ``dlstack --help`` stays fast. A handler is stored as ``func`` and returns an
exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from services.errors import DlstackError

COMMAND_MODULES = (
    "services.server.cli",  # serve
    "services.packaging",  # package
    "services.registry.cli",  # models ...
    "services.datasets",  # datasets ...
    "stacks.render",  # render, render-diff
    "stacks.promote",  # promote, rollback
    "stacks.capacity",  # capacity
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlstack", description="Deep-learning models to production on Kubernetes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except ModuleNotFoundError:  # parent package not written yet
            continue
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DlstackError as exc:
        print(f"dlstack {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
