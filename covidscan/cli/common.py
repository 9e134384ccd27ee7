"""Options and helpers that several ``covidscan`` commands share (not a command itself)."""
from __future__ import annotations

import argparse
import shlex
import sys


def add_carved_split_options(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--val-fraction`` and ``--split-seed`` (how folder/ieee8023 datasets carve out their val split) and
    ``--extra-source`` (further datasets merged in)."""
    parser.add_argument("--val-fraction", type=float, help=f"folder/ieee8023: validation fraction when carved out{note}")
    parser.add_argument("--split-seed", type=int, help=f"folder/ieee8023: seed of the carved-out validation split{note}")
    parser.add_argument("--extra-source", action="append", metavar="KIND:FOLDER",
                        help="add another dataset's images, classes mapped onto this dataset's (repeatable; "
                             "ieee8023:FOLDER maps COVID-19 -> Covid, No Finding -> Normal, viral pneumonia -> "
                             "Viral Pneumonia and drops other findings; see covidscan.datasets.add_sources)")


def dataset_options(args: argparse.Namespace) -> dict:
    """The ``open_dataset`` options given by :func:`add_carved_split_options`'s flags.

    Raises:
        DatasetError: an ``--extra-source`` that is not ``KIND:FOLDER``.
    """
    options = {}
    if args.val_fraction is not None:
        options["val_fraction"] = args.val_fraction
    if args.split_seed is not None:
        options["seed"] = args.split_seed
    if getattr(args, "extra_source", None):
        from covidscan.datasets import parse_source

        options["extra_sources"] = [parse_source(text) for text in args.extra_source]
    return options


def invoked_command() -> str | None:
    """The command line as typed (``covidscan ...``), for a model card or run record."""
    return "covidscan " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
