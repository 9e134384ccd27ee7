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
                             "Viral Pneumonia and drops other findings; see covidscan.sources.add_sources)")


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
        from covidscan.sources import parse_source

        options["extra_sources"] = [parse_source(text) for text in args.extra_source]
    return options


def invoked_command(args: argparse.Namespace | None = None) -> str | None:
    """The command line as typed (``covidscan ...``), for a model card or run record.

    Args:
        args: the parsed arguments; :func:`covidscan.cli.main` records its argv in them, so a
            command run from Python (``main([...])``) is recorded, not the interpreter's own argv.
    """
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    return "covidscan " + " ".join(shlex.quote(a) for a in argv) if argv else None


def add_gate_options(parser: argparse.ArgumentParser, prefix: str = "", scope: str = "val images") -> None:
    """The input gate's fitting options (``gate fit`` uses no prefix; ``cv`` and ``ensemble`` use ``gate-``)."""
    from covidscan.gate import COMBINES, DEFAULT_PASS_RATE

    parser.add_argument(f"--{prefix}tap", action="append", default=[], metavar="LAYER",
                        help="the gate also scores this mid-network block's pooled output (its name inside each "
                             "member, e.g. features.6 of a MobileNetV2; repeatable)")
    parser.add_argument(f"--{prefix}combine", choices=COMBINES, default=COMBINES[0],
                        help="how the final layer's and the taps' scores combine (default: max)")
    parser.add_argument(f"--{prefix}taps-only", action="store_true",
                        help="score only the taps (the final layer's features do not count; needs a tap)")
    parser.add_argument(f"--{prefix}pass-rate", type=float, default=DEFAULT_PASS_RATE,
                        help=f"share of {scope} the gate must pass (default {DEFAULT_PASS_RATE})")


def gate_options(args: argparse.Namespace, prefix: str = "") -> dict:
    """Keyword arguments of the gate fitters from :func:`add_gate_options`' options, checked.

    Returns:
        ``taps``, ``combine``, ``score_head`` and ``pass_rate``.

    Raises:
        CovidscanError: a pass rate outside [0.5, 1), or taps-only without a tap.
    """
    from covidscan.errors import CovidscanError

    key = prefix.replace("-", "_")
    options = {"taps": tuple(getattr(args, f"{key}tap")), "combine": getattr(args, f"{key}combine"),
               "score_head": not getattr(args, f"{key}taps_only"), "pass_rate": getattr(args, f"{key}pass_rate")}
    if not 0.5 <= options["pass_rate"] < 1:
        raise CovidscanError(f"--{prefix}pass-rate must lie between 0.5 and 1 (e.g. 0.99).")
    if not options["score_head"] and not options["taps"]:
        raise CovidscanError(f"--{prefix}taps-only needs at least one --{prefix}tap LAYER.")
    return options
