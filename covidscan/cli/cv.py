"""``covidscan cv``: cross-validated training with an out-of-fold estimate and intervals (see covidscan.cv)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys


def register(subparsers) -> None:
    from covidscan.cli.common import add_gate_options
    from covidscan.cli.fields import add_dataclass_options
    from covidscan.cli.train import add_training_options
    from covidscan.cv import CVOptions
    from covidscan.estimate import DEFAULT_BOOTSTRAP

    parser = subparsers.add_parser(
        "cv", help="K-fold grouped cross-validation: one model per fold, out-of-fold estimate with 95%% intervals")
    add_training_options(parser)
    add_dataclass_options(parser, CVOptions)
    add_gate_options(parser, "gate-", scope="out-of-fold images")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.add_argument("--out", required=True, help="output folder (fold runs, oof.csv, model/)")
    parser.set_defaults(func=run)
    repeats = subparsers.add_parser(
        "cv-repeats", help="record in a fold ensemble's card the estimate of a repeated cross-validation of its recipe")
    repeats.add_argument("bundle", metavar="MODEL", help="a fold ensemble written by covidscan cv (its model/ folder)")
    repeats.add_argument("cv_dirs", metavar="DIR", nargs="+",
                         help="the folder of a covidscan cv --repeats run whose first repeat is MODEL's folds (for a "
                              "model written by cv-join: one per joined run, in the same order)")
    repeats.add_argument("--json", action="store_true", help="print the repeated estimate as JSON")
    repeats.set_defaults(func=run_repeats)
    report = subparsers.add_parser("cv-report", help="a cross-validation run's out-of-fold estimate per data source")
    report.add_argument("cv_dir", metavar="DIR", help="the folder given to covidscan cv --out")
    report.add_argument("--by", choices=("source",), default="source", help="how to split the images (default: source)")
    report.add_argument("--root", help="the dataset folder, if it moved since the run")
    report.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: the run's)")
    report.add_argument("--json", action="store_true", help="print the estimates as JSON")
    report.set_defaults(func=run_report)
    compare = subparsers.add_parser(
        "cv-compare", help="two cross-validated recipes on the same images: A minus B, with paired 95%% intervals")
    compare.add_argument("a", metavar="A", help="a covidscan cv folder, a cross-validated model or an oof.csv")
    compare.add_argument("b", metavar="B", help="the same for the recipe to compare against")
    compare.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                         help=f"bootstrap resamples (default: {DEFAULT_BOOTSTRAP})")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(func=run_compare)
    threshold = subparsers.add_parser(
        "cv-threshold", help="would a decision threshold fitted out of fold beat the argmax? (two-class runs; "
                             "cross-fitted by fold, paired 95%% intervals)")
    threshold.add_argument("run", metavar="RUN", help="a covidscan cv folder, a cross-validated model or an oof.csv")
    threshold.add_argument("--positive-class", help="the class to threshold (default: the COVID class)")
    threshold.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                           help=f"bootstrap resamples (default: {DEFAULT_BOOTSTRAP})")
    threshold.add_argument("--json", action="store_true", help="print the comparison as JSON")
    threshold.set_defaults(func=run_threshold)
    mirror = subparsers.add_parser(
        "cv-mirror", help="would mirror-image test-time augmentation help a fold ensemble? Its held-out images "
                          "rescored plain and mirror-averaged, paired 95%% intervals")
    mirror.add_argument("bundle", metavar="MODEL", help="a fold ensemble written by covidscan cv or cv-join")
    mirror.add_argument("--root", required=True, help="the dataset folder it was cross-validated on")
    mirror.add_argument("--out", required=True, help="folder for the rescored oof-plain.csv and oof-mirrored.csv")
    mirror.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    mirror.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                        help=f"bootstrap resamples (default: {DEFAULT_BOOTSTRAP})")
    mirror.add_argument("--json", action="store_true", help="print the comparison as JSON")
    mirror.set_defaults(func=run_mirror)
    rescore = subparsers.add_parser(
        "cv-rescore", help="restate a fold ensemble's out-of-fold estimate from its stored members (for models whose "
                           "held-out folds were scored before their weights were rounded to float16)")
    rescore.add_argument("bundle", metavar="MODEL", help="a fold ensemble written by covidscan cv or cv-join (rewritten)")
    rescore.add_argument("--root", required=True, help="the dataset folder it was cross-validated on")
    rescore.add_argument("--fold-size", action="append", default=[], metavar="rR-fF=PX",
                         help="the size fold F of repeat R (numbered as in the model's oof.csv) was scored at, for "
                              "models whose card does not record it (repeatable)")
    rescore.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    rescore.add_argument("--json", action="store_true", help="print the estimates before and after as JSON")
    rescore.set_defaults(func=run_rescore)
    average = subparsers.add_parser(
        "cv-average", help="several cross-validated runs averaged per image: their fold models as one ensemble, "
                           "measured out of fold")
    average.add_argument("runs", metavar="RUN", nargs="+",
                         help="covidscan cv folders, cross-validated models or oof.csv files over the same images")
    average.add_argument("--out", required=True, help="the joined oof.csv to write (give it to cv-compare)")
    average.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                         help=f"bootstrap resamples (default: {DEFAULT_BOOTSTRAP})")
    average.add_argument("--json", action="store_true", help="print the estimate as JSON")
    average.set_defaults(func=run_average)
    join = subparsers.add_parser(
        "cv-join", help="several cross-validation runs over the same images shipped as one ensemble of all their "
                        "fold models, with their joined out-of-fold estimate")
    join.add_argument("runs", metavar="RUN", nargs="+", help="finished covidscan cv folders over the same images")
    join.add_argument("--out", required=True, help="the model folder to write")
    join.add_argument("--name", help="the model's name (default: the first run's)")
    join.add_argument("--description", default="", help="the model's description")
    join.add_argument("--device", default="cpu", help="where the fold models compute the gate's features (default: cpu)")
    join.add_argument("--json", action="store_true", help="print the estimate as JSON")
    join.set_defaults(func=run_join)
    nested = subparsers.add_parser(
        "cv-nested", help="fold ensemble or refit? nested cross-validation of a cross-validated model's own recipe")
    nested.add_argument("bundle", metavar="MODEL", help="a model folder written by covidscan cv (its model/ folder)")
    nested.add_argument("--inner-folds", type=int, default=3, help="folds of each inner cross-validation (default: 3)")
    nested.add_argument("--root", help="the dataset folder, if it moved since the model was made")
    nested.add_argument("--outer-fold", type=int, action="append", dest="outer_folds", metavar="K",
                        help="run only this outer fold (repeatable; default: all): cheaper, on fewer images")
    nested.add_argument("--out", required=True, help="output folder (inner runs, oof-*.csv, nested.json)")
    nested.add_argument("--json", action="store_true", help="print the comparison as JSON")
    nested.set_defaults(func=run_nested)


def cv_options_from_args(args: argparse.Namespace):
    """The CVOptions of the command line: its fields' options and the ``--gate-*`` options (the inverse of
    :func:`cv_arguments`).

    Raises:
        CovidscanError: gate options out of range (see :func:`covidscan.cli.common.gate_options`).
    """
    from covidscan.cli.common import gate_options
    from covidscan.cli.fields import given_options
    from covidscan.cv import CVOptions

    gate = gate_options(args, "gate-")
    return CVOptions(**given_options(args, CVOptions), gate_taps=gate["taps"], gate_combine=gate["combine"],
                     gate_taps_only=not gate["score_head"], gate_pass_rate=gate["pass_rate"])


def run(args: argparse.Namespace) -> int:
    from covidscan.cli.train import config_from_args
    from covidscan.cv import cross_validate

    options = cv_options_from_args(args)
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
    print_estimate(result.estimate)
    if result.refit_check:
        from covidscan.refit import check_sentence

        print(check_sentence(result.refit_check))
    print(f"{'Refitted model' if options.refit else 'Ensemble of the fold models'}: {result.bundle_path}")
    return 0


def print_estimate(est: dict) -> None:
    """Print an out-of-fold estimate's headline figures with their intervals, and each repeat's own."""
    from covidscan.estimate import HEADLINE_METRICS

    names = [name for name in HEADLINE_METRICS if est.get(name) is not None]

    def cells(values: dict) -> str:
        return "  ".join(f"{name} {values[name]:.3f} ({values['ci95'][name][0]:.3f}-{values['ci95'][name][1]:.3f})"
                         for name in names if values.get(name) is not None and name in values["ci95"])

    print(f"Out-of-fold estimate over {est['n']} images in {est['groups']} groups (95% intervals):")
    if not est.get("per_repeat"):
        print(f"  {cells(est)}")
    else:
        print(f"  all  {cells(est)}")
        for repeat in est["per_repeat"]:
            print(f"  r{repeat['repeat']:<3d}{cells(repeat)}")
        print("  (all: each image's probabilities averaged over the repeats; rN: that repeat's fold models alone)")


def run_join(args: argparse.Namespace) -> int:
    from covidscan.cli.common import invoked_command
    from covidscan.join import join_runs

    est = join_runs(args.runs, args.out, name=args.name, description=args.description,
                    command=invoked_command(args) or "", device=args.device)
    return _report(est, args.json, f"Ensemble of the {len(args.runs)} runs' fold models: {args.out}")


def _report(est: dict, as_json: bool, closing: str) -> int:
    """Print an estimate as JSON, or its figures and a closing line saying where it went."""
    if as_json:
        print(json.dumps(est, indent=2))
        return 0
    print_estimate(est)
    print(closing)
    return 0


def run_repeats(args: argparse.Namespace) -> int:
    from covidscan.repeats import attach_repeated_estimate

    est = attach_repeated_estimate(args.bundle, args.cv_dirs)
    return _report(est, args.json, f"Recorded as metrics.repeated_estimate in {args.bundle}/card.json "
                                   f"(predictions: {est['predictions']['file']}).")


def cv_arguments(options) -> list[str]:
    """The ``covidscan cv`` options that reproduce ``options`` (a CVOptions), for a job's command line.

    Args:
        options: the cross-validation options; fields at their defaults are left out.

    Returns:
        Arguments such as ``["--folds", "4", "--eval-size", "224", "--eval-size", "288"]``.
    """
    from covidscan.cli.fields import dataclass_arguments
    from covidscan.cv import CVOptions

    defaults = CVOptions()
    arguments = dataclass_arguments(options)
    for tap in options.gate_taps:
        arguments += ["--gate-tap", tap]
    if options.gate_combine != defaults.gate_combine:
        arguments += ["--gate-combine", options.gate_combine]
    if options.gate_taps_only:
        arguments.append("--gate-taps-only")
    if options.gate_pass_rate != defaults.gate_pass_rate:
        arguments += ["--gate-pass-rate", repr(options.gate_pass_rate)]
    return arguments


def covid_class(classes, positive_class: str | None = None) -> str | None:
    """The class whose recall is reported as COVID recall: the positive class, else the first naming COVID."""
    if positive_class in classes:
        return positive_class
    return next((name for name in classes if "covid" in name.lower() and "non" not in name.lower()), None)


def figure_with_interval(estimate: dict, key: str, covid: str | None) -> str | None:
    """``0.876 (0.814-0.927)``: an estimate's figure (``recall[<covid>]``: that class's recall) and its
    95% interval; None when the estimate lacks it."""
    value = estimate["per_class"][covid]["recall"] if key.startswith("recall[") else estimate.get(key)
    if value is None:
        return None
    low, high = estimate["ci95"].get(key, (float("nan"), float("nan")))
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def run_report(args: argparse.Namespace) -> int:
    from covidscan.cv import oof_estimates_by_source

    estimates = oof_estimates_by_source(args.cv_dir, root=args.root, samples=args.bootstrap)
    if args.json:
        print(json.dumps(estimates, indent=2))
        return 0
    classes = list(estimates["all"]["per_class"])
    covid = covid_class(classes)
    columns = [("macro_f1", "macro F1"), ("accuracy", "accuracy")] + ([(f"recall[{covid}]", f"{covid} recall")] if covid else [])
    print(f"{'source':12s} {'images':>6s} {'groups':>6s}  " + "  ".join(f"{title:>22s}" for _, title in columns))
    for name, est in estimates.items():
        cells = [figure_with_interval(est, key, covid) or "n/a" for key, _ in columns]
        print(f"{name:12s} {est['n']:>6d} {est['groups']:>6d}  " + "  ".join(f"{cell:>22s}" for cell in cells))
    print("Figures: out-of-fold predictions, 95% group-bootstrap intervals (per source: groups resampled within it).")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from covidscan.oof import compare_oof

    record = compare_oof(args.a, args.b, samples=args.bootstrap)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"A: {record['a']['file']}\nB: {record['b']['file']}\n"
          f"{record['n']} images in {record['groups']} groups, out of fold")
    _print_paired(record["a"], record["b"], record["differences"], ("A", "B"), "runs")
    return 0


def run_threshold(args: argparse.Namespace) -> int:
    from covidscan.oof import threshold_check

    record = threshold_check(args.run, samples=args.bootstrap, positive_class=args.positive_class)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    chosen = ", ".join(f"fold {fold}: {value:.3f}" for fold, value in record["thresholds"].items())
    print(f"{record['n']} images in {record['groups']} groups, out of fold. {record['positive_class']} threshold "
          f"chosen on the other folds ({chosen}); on all folds {record['threshold_all_folds']:.3f}")
    _print_paired(record["threshold"], record["argmax"], record["differences"], ("threshold", "argmax"),
                  "decision rules")
    return 0


def run_mirror(args: argparse.Namespace) -> int:
    from covidscan.estimate import check_bootstrap_samples
    from covidscan.mirror_check import mirror_check

    check_bootstrap_samples(args.bootstrap)
    record = mirror_check(args.bundle, args.root, args.out, samples=args.bootstrap, device=args.device)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{record['n']} images in {record['groups']} groups, each rescored at the model's input size by the "
          "fold model that never saw it")
    _print_paired(record["a"], record["b"], record["differences"], ("mirrored", "plain"), "predictions")
    print(f"Rescored predictions: {record['a']['file']}, {record['b']['file']}")
    return 0


def run_rescore(args: argparse.Namespace) -> int:
    from covidscan.rescore import parse_fold_sizes, restate_estimate

    record = restate_estimate(args.bundle, args.root, device=args.device, sizes=parse_fold_sizes(args.fold_size))
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    sizes = ", ".join(f"{fold} {size}" for fold, size in record["sizes"].items())
    print(f"Each held-out image rescored by the stored member that never saw it, at its fold's size (px: {sizes}): "
          f"logits moved by up to {record['max_logit_change']:.4f}.")
    for key, title in (("", "estimate"), ("repeated_", "repeated estimate")):
        if f"{key}after" not in record:
            continue
        before, after = record[f"{key}before"], record[f"{key}after"]
        print(f"{title} ({after['n']} images): " + "; ".join(
            f"{name} {before[name]:.3f} -> {after[name]:.3f} (95% CI {after['ci95'][name][0]:.3f}-"
            f"{after['ci95'][name][1]:.3f})" for name in ("auc", "accuracy", "macro_f1")
            if before.get(name) is not None and after.get(name) is not None))
    print(f"Rewritten: {args.bundle}'s card and out-of-fold predictions.")
    return 0


def _print_paired(a: dict, b: dict, differences: dict, titles: tuple[str, str], compared: str) -> None:
    """A paired comparison as a table: each metric for A and B, and A - B with its paired 95% interval."""
    first, second = titles
    print(f"{'metric':12s} {first:>9s} {second:>9s}  {first} - {second} (95% paired interval)")
    for name, diff in differences.items():
        low, high = diff["ci95"]
        print(f"{name:12s} {a[name]:9.3f} {b[name]:9.3f}  {diff['difference']:+.3f} ({low:+.3f} to {high:+.3f})")
    print(f"Intervals: group bootstrap resampling the same groups for both {compared}.")


def run_average(args: argparse.Namespace) -> int:
    from pathlib import Path

    from covidscan.errors import TrainingError
    from covidscan.estimate import check_bootstrap_samples
    from covidscan.oof import average_oof, oof_csv, oof_estimate
    from covidscan.utils import atomic_write_text

    check_bootstrap_samples(args.bootstrap)
    rows, classes = average_oof(args.runs)
    out = Path(args.out)
    if out.is_dir():
        raise TrainingError(f"{out} is a folder; give a file name such as averaged-oof.csv.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, oof_csv(rows, classes))
    except OSError as exc:
        raise TrainingError(f"Cannot write {out}: {exc.strerror or exc}.") from None
    record = oof_estimate(rows, classes, None, f"Out-of-fold predictions of {len(args.runs)} cross-validated runs, "
                          "averaged per image over the models that never saw it.", args.bootstrap)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{len(args.runs)} runs averaged per image: {record['n']} images in {record['groups']} groups, out of fold")
    covid = covid_class(classes)
    for name in ("auc", "accuracy", "macro_f1", "sensitivity", "specificity", *([f"recall[{covid}]"] if covid else [])):
        cell = figure_with_interval(record, name, covid)
        if cell is not None:
            print(f"{name:18s} {cell}")
    print(f"Joined predictions: {out} (compare them with covidscan cv-compare {out} OTHER)")
    return 0


def run_nested(args: argparse.Namespace) -> int:
    from covidscan.nested import nested_cv

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        record = nested_cv(args.bundle, args.out, inner_folds=args.inner_folds, root=args.root,
                           outer_folds=args.outer_folds)
    if record is None:
        print("covidscan: nested cross-validation cancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"Nested cross-validation of {record['bundle']}: outer folds {', '.join(record['input_size_per_outer_fold'])}, "
          f"inner {record['inner_folds']}-fold ensembles")
    print(f"{'metric':10s} {'fold ensemble':>22s} {'single model':>22s} {'difference':>24s}")
    for name, diff in record["ensemble_minus_single"].items():
        cells = []
        for which in ("ensemble", "single"):
            est = record["estimates"][which]
            low, high = est["ci95"].get(name, (float("nan"), float("nan")))
            cells.append(f"{est[name]:.3f} ({low:.3f}-{high:.3f})")
        low, high = diff["ci95"]
        print(f"{name:10s} {cells[0]:>22s} {cells[1]:>22s} {diff['difference']:+.3f} ({low:+.3f}-{high:+.3f})")
    print("Figures: out-of-fold, 95% paired group-bootstrap intervals; the single model stands for a refit on all images.")
    return 0
