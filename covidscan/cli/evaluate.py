"""``covidscan evaluate``: metrics of a model bundle on a dataset split (JSON to stdout, plots on request)."""
from __future__ import annotations

import argparse
import json

from covidscan.cli.common import add_carved_split_options, dataset_options
from covidscan.datasets import DATASET_KINDS


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="measure a model bundle on a dataset split")
    parser.add_argument("--model", required=True, help="path of a model bundle")
    parser.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--plots", metavar="DIR", help="write ROC, confusion, calibration and error plots here")
    parser.add_argument("--tta", action="store_true", help="average each image with its mirror image")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--cam-check", action="store_true",
                        help="also explain every slice and report the mean share of the CAM inside the lungs (CT)")
    parser.add_argument("--cam-method", default="gradcam", help="CAM method of --cam-check (default: gradcam)")
    parser.add_argument("--cam-limit", type=int, help="--cam-check only the first N slices")
    add_carved_split_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.evaluation import evaluate_bundle

    options = dataset_options(args)
    report = evaluate_bundle(args.model, args.dataset, args.root, args.split, tta=args.tta, device=args.device,
                             plots_dir=args.plots, dataset_options=options)
    if args.cam_check:
        from covidscan.camcheck import cam_check

        report["cam_check"] = cam_check(args.model, args.dataset, args.root, args.split, method=args.cam_method,
                                        limit=args.cam_limit, device=args.device, dataset_options=options)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['dataset']} / {report['split']} ({report['n']} images)")
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "macro_f1", "auc", "ece"):
        value = report.get(key)
        print(f"  {key:12s} {'n/a' if value is None else f'{value:.4f}'}")
    print("  confusion (rows true, columns predicted; " + ", ".join(report["classes"]) + "):")
    for row in report["confusion_matrix"]:
        print("    " + " ".join(f"{v:5d}" for v in row))
    check = report.get("cam_check")
    if check and check["mean_in_lungs"] is not None:
        print(f"  {check['method']} inside the lungs: mean {check['mean_in_lungs']:.3f} over {check['n_with_mask']} "
              f"slices; {len(check['outside'])} slice(s) mostly outside")
    elif check:
        print(f"  CAM check: {check['note']}")
    for path in report.get("plots", []):
        print(f"  plot: {path}")
    return 0
