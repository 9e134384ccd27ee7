"""``covidscan train``, ``lr-find`` and ``grid``: fine-tune models and write run directories (see covidscan.training)."""
from __future__ import annotations

import argparse
import sys

from covidscan.cli.common import add_carved_split_options, dataset_options, invoked_command
from covidscan.datasets import DATASET_KINDS


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``train``, ``lr-find`` and ``grid``."""
    from covidscan.models import DEFAULT_ARCHITECTURE
    from covidscan.training import AUGMENT_PRESETS, BALANCE_MODES, MONITORS, SCHEDULES

    parser.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--arch", default=DEFAULT_ARCHITECTURE, help=f"architecture (default {DEFAULT_ARCHITECTURE})")
    parser.add_argument("--pretrained", action="store_true", help="start from ImageNet weights")
    parser.add_argument("--init-weights", help="start from a bundle/.safetensors whose tensors fit (e.g. self-supervised)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, help="input size in pixels (default: the architecture's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the head")
    parser.add_argument("--backbone-lr-factor", type=float, default=0.1, help="backbone lr = lr x this")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--freeze-epochs", type=int, default=0, help="epochs with the backbone frozen")
    parser.add_argument("--schedule", choices=SCHEDULES, default="onecycle")
    parser.add_argument("--augment", choices=AUGMENT_PRESETS, default="light")
    parser.add_argument("--balance", choices=BALANCE_MODES, default="none")
    parser.add_argument("--monitor", choices=MONITORS, default="val_auc")
    parser.add_argument("--progressive-resize", help="comma-separated sizes, e.g. 128,224")
    parser.add_argument("--patience", type=int, help="early stopping after this many epochs without improvement")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--modality", choices=("CT", "X-ray"), default="CT")
    parser.add_argument("--positive-class", help="class whose sensitivity/specificity are reported (default: COVID)")
    parser.add_argument("--tune-threshold", action="store_true", help="choose the positive-class threshold on val")
    parser.add_argument("--no-calibrate", action="store_true", help="do not fit a temperature on val")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--max-train-batches", type=int, help="cap batches per epoch (quick checks)")
    parser.add_argument("--frozen-blocks", type=int,
                        help="keep the first N feature blocks frozen and cache their outputs (fast on CPU)")
    parser.add_argument("--feature-views", type=int, default=4, help="augmented views cached per image with --frozen-blocks")
    add_carved_split_options(parser)
    parser.add_argument("--name", help="model name in the card")
    parser.add_argument("--description", default="", help="model card description")


def config_from_args(args: argparse.Namespace):
    from covidscan.errors import TrainingError
    from covidscan.training import TrainConfig

    sizes = None
    if args.progressive_resize:
        try:
            sizes = [int(s) for s in args.progressive_resize.split(",") if s.strip()]
        except ValueError:
            raise TrainingError(f"--progressive-resize wants sizes like 128,224, not '{args.progressive_resize}'.") from None
    options = dataset_options(args)
    return TrainConfig(
        dataset=args.dataset, root=args.root, arch=args.arch, pretrained=args.pretrained, epochs=args.epochs,
        image_size=args.image_size, batch_size=args.batch_size, lr=args.lr, backbone_lr_factor=args.backbone_lr_factor,
        weight_decay=args.weight_decay, freeze_epochs=args.freeze_epochs, schedule=args.schedule, augment=args.augment,
        balance=args.balance, monitor=args.monitor, progressive_resize=sizes, patience=args.patience,
        label_smoothing=args.label_smoothing, seed=args.seed, device=args.device, modality=args.modality,
        positive_class=args.positive_class, tune_threshold=args.tune_threshold, calibrate=not args.no_calibrate,
        num_workers=args.num_workers, max_train_batches=args.max_train_batches, dataset_options=options,
        init_weights=args.init_weights, frozen_blocks=args.frozen_blocks,
        feature_views=args.feature_views, name=args.name, description=args.description,
        command=invoked_command(),
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a model on a dataset and save the best as a bundle")
    add_training_options(parser)
    parser.add_argument("--out", required=True, help="run directory (config.json, metrics.csv, progress.json, model/)")
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

    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
        sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else [args.image_size or get_spec(args.arch).input_size]
    except ValueError:
        raise TrainingError("--lrs and --sizes want comma-separated numbers, e.g. --lrs 1e-3,3e-4 --sizes 128,224.") from None
    archs = [a.strip() for a in args.archs.split(",")] if args.archs else [args.arch]
    rows = grid_search(config_from_args(args), args.out, lrs, archs, sizes)
    print(f"{'rank':>4}  {'run':40s} {args.monitor:>10s}  epoch")
    for rank, row in enumerate(rows, 1):
        metric = "n/a" if row["best_metric"] is None else f"{row['best_metric']:.4f}"
        print(f"{rank:>4}  {row['run']:40s} {metric:>10s}  {row['best_epoch']}")
    return 0


def run(args: argparse.Namespace) -> int:
    from covidscan.training import train

    result = train(config_from_args(args), args.out)
    if result.state == "cancelled":
        print("covidscan: training cancelled", file=sys.stderr)
        return 130
    print(f"Best model: {result.bundle_path} ({args.monitor} {result.best_metric} at epoch {result.best_epoch})")
    return 0
