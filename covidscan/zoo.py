"""The shipped default models in the repository's ``weights/`` folder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from covidscan.bundle import CARD_FILE, ModelCard, read_card
from covidscan.errors import ModelBundleError

#: Override the folder of shipped models (e.g. in a container) with this environment variable.
WEIGHTS_ENV = "COVIDSCAN_WEIGHTS_DIR"


def weights_dir() -> Path:
    """The folder holding the shipped model bundles."""
    return Path(os.environ.get(WEIGHTS_ENV) or Path(__file__).resolve().parent.parent / "weights")


@dataclass
class ShippedModel:
    """One shipped bundle, described by its card (weights are not loaded)."""

    name: str
    path: Path
    card: ModelCard

    def to_dict(self) -> dict:
        card = self.card
        return {"name": self.name, "path": str(self.path), "modality": card.modality, "classes": card.classes,
                "architecture": card.architecture, "ensemble_size": card.ensemble_size, "input_size": card.input_size, "metrics": card.metrics,
                "description": card.description}


def shipped_models(folder: str | os.PathLike | None = None) -> list[ShippedModel]:
    """Every valid bundle directly under ``folder`` (default :func:`weights_dir`), sorted by name.

    A damaged bundle is skipped rather than hiding the others.
    """
    root = Path(folder) if folder is not None else weights_dir()
    found = []
    for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
        try:
            card = read_card(card_path.parent)
        except ModelBundleError:
            continue
        found.append(ShippedModel(name=card_path.parent.name, path=card_path.parent, card=card))
    return found


def default_model(modality: str, folder: str | os.PathLike | None = None) -> ShippedModel | None:
    """The first shipped model for ``modality`` ("CT" or "X-ray"), or None."""
    return next((m for m in shipped_models(folder) if m.card.modality == modality), None)
