"""``covidscan gate fit``: fit a bundle's input gate (OOD check) and uncertainty summary from its training data."""
from __future__ import annotations

import argparse

from covidscan.cli.common import add_carved_split_options, add_gate_options, dataset_options, gate_options
from covidscan.datasets import DATASET_KINDS


def register(subparsers) -> None:
    parser = subparsers.add_parser("gate", help="input gate: flag images unlike a model's training images")
    actions = parser.add_subparsers(dest="gate_action", metavar="ACTION")
    fit = actions.add_parser("fit", help="fit a bundle's gate on its training data and store it in the bundle")
    fit.add_argument("--model", help="the model bundle folder (its weights are not changed)")
    fit.add_argument("--cv-dir", help="instead of --model/--dataset: a covidscan cv output folder; its ensemble's gate "
                                      "is fitted out of fold (each fold model on its own held-out fold)")
    fit.add_argument("--dataset", choices=DATASET_KINDS, help="the model's training data: layout")
    fit.add_argument("--root", help="the model's training data: folder (with --cv-dir: only if it moved)")
    fit.add_argument("--train-split", default="train", help="split whose features give the statistics (default: train)")
    fit.add_argument("--val-split", default="val", help="split that sets the threshold (default: val)")
    add_carved_split_options(fit)
    add_gate_options(fit)
    fit.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    fit.set_defaults(func=run_fit)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_fit(args: argparse.Namespace) -> int:
    import torch

    from covidscan.errors import CovidscanError
    from covidscan.gate import fit_gate_for_bundle

    fitting = gate_options(args)
    if bool(args.cv_dir) == bool(args.model) or (args.model and not (args.dataset and args.root)):
        raise CovidscanError("Give either --cv-dir DIR, or --model with --dataset and --root.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.cv_dir:
        from covidscan.cv_gate import fit_cv_gate

        gate = fit_cv_gate(args.cv_dir, root=args.root, device=device, **fitting)
        print(f"Wrote the input gate of {args.cv_dir}/model: threshold {gate['threshold']:.3f}, "
              f"{gate['calibration_pass_rate']:.1%} of {gate['n_calibration']} out-of-fold images pass"
              + (f" (taps {', '.join(gate['taps'])})" if gate.get("taps") else ""))
        if gate["uncertainty"]["summary"]:
            print(f"  uncertainty: {gate['uncertainty']['summary']}")
        return 0
    gate = fit_gate_for_bundle(args.model, args.dataset, args.root, dataset_options(args) or None,
                               train_split=args.train_split, val_split=args.val_split, device=device, **fitting)
    print(f"Wrote the input gate of {args.model}: threshold {gate['threshold']:.3f}, "
          f"{gate['calibration_pass_rate']:.1%} of {gate['n_calibration']} {args.val_split} images pass "
          f"(statistics from {gate['n_train']} {args.train_split} images"
          + (f"; taps {', '.join(gate['taps'])}" if gate.get("taps") else "") + ")")
    if gate["uncertainty"]["summary"]:
        print(f"  uncertainty: {gate['uncertainty']['summary']}")
    return 0
