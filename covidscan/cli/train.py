"""``covidscan train``, ``lr-find`` and ``grid``: fine-tune models and write run directories (see covidscan.training).

Their options are generated from :class:`~covidscan.training.TrainConfig`'s fields
(:mod:`covidscan.cli.fields`); ``--config FILE`` starts from a saved config (a run's
``config.json``), and options typed as well override it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidscan.cli.common import add_carved_split_options, dataset_options, invoked_command
from covidscan.cli.fields import add_dataclass_options, given_options, missing_required


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``train``, ``lr-find`` and ``grid``: ``--config`` and one per TrainConfig field."""
    from covidscan.training import TrainConfig

    parser.add_argument("--config", metavar="FILE",
                        help="start from a saved configuration (e.g. a run's config.json); options given too override it")
    add_dataclass_options(parser, TrainConfig, config_option=True)
    add_carved_split_options(parser)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of the command line: ``--config``'s file (if any), overridden by the options typed.

    The modality comes from the dataset where it implies one (covid-ct: CT, ieee8023: X-ray); a
    class-per-folder dataset needs ``--modality``.

    Raises:
        TrainingError: a required option is missing, or the config file cannot be read.
    """
    from covidscan.errors import TrainingError
    from covidscan.training import TrainConfig, infer_modality
    from covidscan.training.config import read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given_options(args, TrainConfig))
    carved = dataset_options(args)
    if carved:
        values["dataset_options"] = {**(values.get("dataset_options") or {}), **carved}
    missing = missing_required(TrainConfig, values)
    if missing:
        raise TrainingError(f"The following options are required: {', '.join(missing)} (or --config FILE).")
    if values.get("modality") is None:
        values["modality"] = infer_modality(values["dataset"])
        if values["modality"] is None:
            raise TrainingError(f"--modality is required for --dataset {values['dataset']}: say CT or X-ray (a "
                                "class-per-folder dataset can hold either; the model card records it).")
    values["command"] = invoked_command(args)
    return TrainConfig.from_dict(values)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a model on a dataset and save the best as a bundle")
    add_training_options(parser)
    parser.add_argument("--out", help="run directory (config.json, metrics.csv, progress.json, model/); default "
                                      "with --config: the config file's folder, if it holds no run yet")
    parser.set_defaults(func=run)
    register_lr_find(subparsers)
    register_grid(subparsers)


def register_lr_find(subparsers) -> None:
    parser = subparsers.add_parser("lr-find", help="learning-rate range test: loss curve and a suggested lr")
    add_training_options(parser)
    parser.add_argument("--steps", type=int, default=60, help="number of lr steps")
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run_lr_find)


def run_lr_find(args: argparse.Namespace) -> int:
    import json

    from covidscan.training import find_lr

    curve = find_lr(config_from_args(args), args.start_lr, args.end_lr, args.steps)
    if args.json:
        print(json.dumps({"lrs": curve.lrs, "losses": curve.losses, "suggestion": curve.suggestion}))
    else:
        for lr, loss in zip(curve.lrs, curve.losses):
            print(f"{lr:10.3g}  {loss:.4f}")
        print(f"Suggested learning rate: {curve.suggestion:.3g}" if curve.suggestion else "No suggestion (curve too short).")
    return 0


def register_grid(subparsers) -> None:
    parser = subparsers.add_parser("grid", help="grid search over lr x architecture x image size, ranked on val")
    add_training_options(parser)
    parser.add_argument("--lrs", default="1e-3,3e-4", help="comma-separated learning rates")
    parser.add_argument("--archs", help="comma-separated architectures (default: --arch)")
    parser.add_argument("--sizes", help="comma-separated image sizes (default: --image-size)")
    parser.add_argument("--out", required=True, help="folder for one run directory per combination + grid.csv")
    parser.set_defaults(func=run_grid)


def run_grid(args: argparse.Namespace) -> int:
    from covidscan.errors import TrainingError
    from covidscan.models import get_spec
    from covidscan.training import grid_search

    config = config_from_args(args)
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
        sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else [config.image_size or get_spec(config.arch).input_size]
    except ValueError:
        raise TrainingError("--lrs and --sizes want comma-separated numbers, e.g. --lrs 1e-3,3e-4 --sizes 128,224.") from None
    archs = [a.strip() for a in args.archs.split(",")] if args.archs else [config.arch]
    rows = grid_search(config, args.out, lrs, archs, sizes)
    print(f"{'rank':>4}  {'run':40s} {config.monitor:>10s}  epoch")
    for rank, row in enumerate(rows, 1):
        metric = "n/a" if row["best_metric"] is None else f"{row['best_metric']:.4f}"
        print(f"{rank:>4}  {row['run']:40s} {metric:>10s}  {row['best_epoch']}")
    return 0


def out_dir(args: argparse.Namespace) -> Path:
    """``--out``, or with ``--config`` the config file's folder when it holds no run yet (a job's launch config)."""
    from covidscan.errors import TrainingError

    if args.out:
        return Path(args.out)
    if not getattr(args, "config", None):
        raise TrainingError("--out is required: the run directory to write.")
    folder = Path(args.config).parent
    if (folder / "metrics.csv").exists() or (folder / "model").exists():
        raise TrainingError(f"{folder} already holds a training run; give --out DIR for the new one.")
    return folder


def run(args: argparse.Namespace) -> int:
    from covidscan.training import train

    config = config_from_args(args)
    result = train(config, out_dir(args))
    if result.state == "cancelled":
        print("covidscan: training cancelled", file=sys.stderr)
        return 130
    print(f"Best model: {result.bundle_path} ({config.monitor} {result.best_metric} at epoch {result.best_epoch})")
    return 0
