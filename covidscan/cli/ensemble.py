"""``covidscan ensemble``: combine trained bundles into one ensemble bundle, calibrated and measured on val."""
from __future__ import annotations

import argparse

from covidscan.cli.common import add_carved_split_options, add_gate_options, dataset_options, gate_options, invoked_command
from covidscan.datasets import DATASET_KINDS


def register(subparsers) -> None:
    parser = subparsers.add_parser("ensemble", help="average several trained models into one bundle")
    parser.add_argument("--members", nargs="+", required=True, metavar="BUNDLE",
                        help="member bundles (same architecture, classes and input size)")
    parser.add_argument("--out", required=True, help="folder of the new ensemble bundle")
    parser.add_argument("--name", help="the ensemble's name (default: the folder's name)")
    parser.add_argument("--description", default="", help="one line for the model card")
    parser.add_argument("--dataset", choices=DATASET_KINDS, help="validation data: dataset layout")
    parser.add_argument("--root", help="validation data: dataset folder")
    parser.add_argument("--split", default="val", help="split to calibrate and measure on (default: val)")
    add_carved_split_options(parser)
    add_gate_options(parser, "gate-", scope="the calibration split's images")
    parser.add_argument("--no-calibrate", action="store_true", help="keep temperature 1")
    parser.add_argument("--float32", action="store_true", help="store float32 weights (default float16, half the size)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from covidscan.ensemble import build_ensemble
    from covidscan.errors import DatasetError

    if (args.dataset is None) != (args.root is None):
        raise DatasetError("Give both --dataset and --root to calibrate and measure the ensemble, or neither.")
    options = dataset_options(args)
    gate = gate_options(args, "gate-")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    card = build_ensemble(
        args.members, args.out, name=args.name or Path(args.out).name, dataset=args.dataset, root=args.root,
        split=args.split, dataset_options=options, calibrate=not args.no_calibrate,
        weights_dtype="float32" if args.float32 else "float16", description=args.description,
        command=invoked_command(args) or "", device=device, gate_options=gate,
    )
    print(f"Wrote {card.architecture_label} '{card.name}' to {args.out}")
    for split, metrics in card.metrics.items():
        members = ", ".join(f"{m['metrics'][split]['auc']:.4f}" for m in card.training["ensemble_of"]
                            if m.get("metrics", {}).get(split, {}).get("auc") is not None)
        print(f"  {split}: accuracy {metrics['accuracy']:.4f}, AUC {metrics['auc']:.4f}, F1 {metrics['f1']:.4f}, "
              f"temperature {card.temperature:.3f}" + (f" (member AUCs {members})" if members else ""))
    return 0
