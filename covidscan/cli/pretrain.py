"""``covidscan pretrain``: SimCLR self-supervised pretraining of a backbone (see covidscan.pretrain).

Its options are generated from :class:`~covidscan.pretrain.PretrainConfig`'s fields (:mod:`covidscan.cli.fields`).
"""
from __future__ import annotations

import argparse
import sys

from covidscan.cli.common import add_carved_split_options, dataset_options, invoked_command
from covidscan.cli.fields import add_dataclass_options, cli_defaults, given_options, missing_required


def register(subparsers) -> None:
    from covidscan.pretrain import PretrainConfig

    parser = subparsers.add_parser(
        "pretrain", help="contrastive (SimCLR) pretraining on a split's images, labels ignored; "
                         "use the weights with `covidscan train --init-weights`")
    add_dataclass_options(parser, PretrainConfig)
    add_carved_split_options(parser, " (use the same as for train)")
    parser.add_argument("--out", required=True, help="backbone weights to write (FILE.safetensors; FILE.safetensors.json too)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The PretrainConfig of the command line."""
    from covidscan.errors import TrainingError
    from covidscan.pretrain import PretrainConfig

    values = {**cli_defaults(PretrainConfig), **given_options(args, PretrainConfig)}
    missing = missing_required(PretrainConfig, values)
    if missing:
        raise TrainingError(f"The following options are required: {', '.join(missing)}.")
    return PretrainConfig(**values, dataset_options=dataset_options(args), command=invoked_command(args))


def run(args: argparse.Namespace) -> int:
    from covidscan.pretrain import pretrain

    config = config_from_args(args)
    result = pretrain(config, args.out)
    if result.state == "cancelled":
        print("covidscan: pretraining cancelled; nothing was written", file=sys.stderr)
        return 130
    print(f"Backbone weights: {result.out_path} (final loss {result.losses[-1]:.4f}); "
          f"fine-tune with: covidscan train ... --arch {config.arch} --init-weights {result.out_path}")
    return 0
