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
from typing import NoReturn

from services.serving.errors import DlstackError

COMMAND_MODULES = (
    "services.serving.server.cli",  # serve
    "services.packaging",  # package
    "services.registry.cli",  # models ...
    "services.datasets",  # datasets ...
    "stacks.render",  # render, render-diff
    "stacks.promote",  # promote, rollback
    "stacks.capacity",  # capacity
    "stacks.outputs",  # outputs
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that answers a missing subcommand with the full help (subparsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        # `dlstack` or `dlstack models` alone asks "what can I do?": the command list answers it,
        # argparse's bare "arguments are required: COMMAND" does not. Exit 2 as for any usage error.
        if message.startswith("the following arguments are required:") and any(
            isinstance(a, argparse._SubParsersAction) and a.required and str(a.metavar or a.dest) in message
            for a in self._actions
        ):
            self.print_help()
            self.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlstack", description="Deep-learning models to production on Kubernetes.")
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
