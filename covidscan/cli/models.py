"""``covidscan models``: list the shipped models."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the shipped models")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.zoo import shipped_models

    models = shipped_models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    if not models:
        print("No shipped models found.")
    for model in models:
        card = model.card
        print(f"{model.name}: {card.modality} {card.architecture_label} {card.input_size}px "
              f"classes={', '.join(card.classes)}\n  {model.path}")
    return 0
