"""``covidscan cv``: cross-validated training with an out-of-fold estimate and intervals (see covidscan.cv)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys


def register(subparsers) -> None:
    from covidscan.cli.train import add_training_options
    from covidscan.cli.common import add_gate_options
    from covidscan.cv import CVOptions

    defaults = CVOptions()
    parser = subparsers.add_parser(
        "cv", help="K-fold grouped cross-validation: one model per fold, out-of-fold estimate with 95%% intervals")
    add_training_options(parser)
    parser.add_argument("--folds", type=int, default=defaults.folds, help=f"number of folds (default {defaults.folds})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="repeat with reshuffled folds")
    parser.add_argument("--cv-seed", type=int, default=defaults.seed, help="seed of the fold assignment")
    parser.add_argument("--inner-val-fraction", type=float, default=defaults.inner_val_fraction,
                        help="share of each fold's training images used to choose its epoch")
    parser.add_argument("--near-duplicate-distance", type=int, default=defaults.near_duplicate_distance,
                        help="pHash bits within which two images count as one picture (-1: do not merge)")
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="bootstrap resamples for intervals")
    parser.add_argument("--weights-dtype", choices=("float16", "float32"), default=defaults.weights_dtype)
    add_gate_options(parser, "gate-", scope="out-of-fold images")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.add_argument("--out", required=True, help="output folder (fold runs, oof.csv, model/)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.cli.common import gate_options
    from covidscan.cli.train import config_from_args
    from covidscan.cv import CVOptions, cross_validate

    gate = gate_options(args, "gate-")
    options = CVOptions(folds=args.folds, repeats=args.repeats, seed=args.cv_seed,
                        inner_val_fraction=args.inner_val_fraction,
                        near_duplicate_distance=None if args.near_duplicate_distance < 0 else args.near_duplicate_distance,
                        bootstrap=args.bootstrap, weights_dtype=args.weights_dtype,
                        gate_taps=gate["taps"], gate_combine=gate["combine"],
                        gate_taps_only=not gate["score_head"], gate_pass_rate=gate["pass_rate"])
    config = config_from_args(args)
    # With --json, stdout carries the estimate alone; the folds' training logs go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = cross_validate(config, options, args.out)
    if result.state == "cancelled":
        print("covidscan: cross-validation cancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.estimate, indent=2))
        return 0
    est = result.estimate
    print(f"Out-of-fold estimate over {est['n']} images in {est['groups']} groups:")
    for name in ("auc", "accuracy", "macro_f1", "sensitivity", "specificity"):
        if est.get(name) is not None:
            low, high = est["ci95"].get(name, (float("nan"), float("nan")))
            print(f"  {name:12s} {est[name]:.3f}  (95% CI {low:.3f}-{high:.3f})")
    print(f"Ensemble of the fold models: {result.bundle_path}")
    return 0
