"""The ``covidscan`` command line. Each sub-command lives in its own module with ``register``."""
from __future__ import annotations

import argparse
import importlib
import sys

from covidscan import __version__

# Modules under covidscan.cli, each with register(subparsers) that sets a `func(args) -> int` default.
# The module name is the command's name.
COMMAND_MODULES = (
    "predict",
    "models",
    "train",
    "evaluate",
    "ensemble",
    "jobs",
    "pretrain",
    "cv",
    "weights",
    "serve",
    "app",
    "gate",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's module is imported (fast start-up)."""
    parser = argparse.ArgumentParser(
        prog="covidscan",
        description="COVID-19 findings on chest CT and X-ray with Grad-CAM. Research use only: not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"covidscan {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES if only is None else (only,):
        importlib.import_module(f"covidscan.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. Errors the user can fix print one line, never a traceback."""
    from covidscan.errors import CovidscanError

    argv = sys.argv[1:] if argv is None else list(argv)
    # Importing every command's module would import torch even for `covidscan jobs list`.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMAND_MODULES else None)
    args = parser.parse_args(argv)
    args.argv = argv  # for the command line recorded in cards (see covidscan.cli.common.invoked_command)
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
