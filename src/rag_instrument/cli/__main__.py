"""``rag-instrument``: run the demo and diagnose services.

Each subcommand lives in its own module with ``add_parser(subparsers)`` (which registers
the subcommand and sets ``func`` on it) so that this file stays a dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from rag_instrument import __version__

__all__ = ["build_parser", "main"]

_SUBCOMMANDS = (
    "rag_instrument.cli.demo",
    "rag_instrument.cli.db_doctor",
    "rag_instrument.cli.analyze",
    "rag_instrument.cli.compare",
    "rag_instrument.cli.report",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="rag-instrument",
        description="Where each request's time goes in a RAG backend.",
    )
    parser.add_argument("--version", action="version", version=f"rag-instrument {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in (*_SUBCOMMANDS, "rag_instrument.cli.sweep"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # a subcommand whose module is not there (yet) is simply not offered
        module.add_parser(subparsers)
    for sub in subparsers.choices.values():
        sub.description = _plain(sub.description)
        sub.epilog = _plain(sub.epilog)
    return parser


_REST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _plain(text: str | None) -> str | None:
    """Help text taken from a docstring, without its reStructuredText markup."""
    if not text:
        return text
    return _REST_ROLE.sub(r"\1", text).replace("``", "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status: int = func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`rag-instrument analyze big.jsonl | head`): not an error.
        # Point stdout at nothing so that the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
