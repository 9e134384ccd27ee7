"""``covidscan models``: list the models on offer (shipped, promoted, finished training runs)."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the models `predict --model NAME` accepts")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.catalog import available_models

    models = available_models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    if not models:
        print("No models found: install one in weights/, or train and promote one.")
    for model in models:
        card = model.card
        print(f"{model.name}: {model.source}, {card.modality} {card.architecture_label} {card.input_size}px "
              f"classes={', '.join(card.classes)}\n  {model.path}")
    return 0
