"""The ``covidscan`` command line. Each sub-command lives in its own module with ``register``."""
from __future__ import annotations

import argparse
import importlib
import sys

from covidscan import __version__

# Modules under covidscan.cli, each with register(subparsers) that sets a `func(args) -> int` default.
COMMAND_MODULES = ("predict", "models", "train", "evaluate", "jobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidscan",
        description="COVID-19 findings on chest CT and X-ray with Grad-CAM. Research use only: not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"covidscan {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"covidscan.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. Errors the user can fix print one line, never a traceback."""
    from covidscan.errors import CovidscanError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CovidscanError as exc:
        print(f"covidscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidscan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
