"""``covidscan pretrain``: SimCLR self-supervised pretraining of a backbone (see covidscan.pretrain)."""
from __future__ import annotations

import argparse
import sys

from covidscan.cli.common import add_carved_split_options, dataset_options, invoked_command
from covidscan.datasets import DATASET_KINDS


def register(subparsers) -> None:
    from covidscan.models import DEFAULT_ARCHITECTURE

    parser = subparsers.add_parser(
        "pretrain", help="contrastive (SimCLR) pretraining on a split's images, labels ignored; "
                         "use the weights with `covidscan train --init-weights`")
    parser.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--split", default="train", help="split whose images are used (default: train)")
    parser.add_argument("--arch", default=DEFAULT_ARCHITECTURE, help=f"architecture (default {DEFAULT_ARCHITECTURE})")
    parser.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (recommended)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=160, help="view size in pixels (default 160)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step; the loss sees two views of each")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, cosine-decayed")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    parser.add_argument("--projection-dim", type=int, default=128, help="output size of the projection head")
    parser.add_argument("--window", default="lung", help="CT window for DICOM slices: lung, mediastinum, bone or file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--max-batches", type=int, help="cap steps per epoch (quick checks)")
    add_carved_split_options(parser, " (use the same as for train)")
    parser.add_argument("--out", required=True, help="backbone weights to write (FILE.safetensors; FILE.safetensors.json too)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.pretrain import PretrainConfig, pretrain

    options = dataset_options(args)
    config = PretrainConfig(
        dataset=args.dataset, root=args.root, split=args.split, arch=args.arch, pretrained=args.pretrained,
        epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, temperature=args.temperature, projection_dim=args.projection_dim,
        seed=args.seed, device=args.device, dataset_options=options, max_batches=args.max_batches,
        window=args.window, command=invoked_command(),
    )
    result = pretrain(config, args.out)
    if result.state == "cancelled":
        print("covidscan: pretraining cancelled; nothing was written", file=sys.stderr)
        return 130
    print(f"Backbone weights: {result.out_path} (final loss {result.losses[-1]:.4f}); "
          f"fine-tune with: covidscan train ... --arch {args.arch} --init-weights {result.out_path}")
    return 0
