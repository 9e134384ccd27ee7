"""Which models the API serves, and loading them once.

The list of models comes through :func:`available_models` alone, so switching the source of the
list (e.g. to a catalog of shipped, promoted and trained models) is a one-line change.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidscan.errors import CovidscanError, ModelBundleError


def available_models() -> list[Any]:
    """The models served by default: every model ``covidscan models`` lists (shipped, promoted, trained)."""
    from covidscan.catalog import available_models as catalog_models

    return catalog_models()


@dataclass
class ServedModel:
    """One model the API answers for: its public record, and its predictor once loaded."""

    name: str
    path: Path
    record: dict
    predictor: Any = None
    error: str | None = None


def resolve_models(names_or_paths: list[str] | None) -> list[ServedModel]:
    """The models to serve: every available model, or those named (by catalog name or bundle path).

    Raises:
        ModelBundleError: a name that is neither an available model nor a bundle folder.
    """
    catalog = available_models()
    if not names_or_paths:
        return [ServedModel(m.name, Path(m.path), m.to_dict()) for m in catalog]
    by_name = {m.name: m for m in catalog}
    served: list[ServedModel] = []
    for item in names_or_paths:
        if item in by_name:
            model = by_name[item]
            served.append(ServedModel(model.name, Path(model.path), model.to_dict()))
            continue
        path = Path(item)
        if not path.exists():
            known = ", ".join(by_name) or "none"
            raise ModelBundleError(f"No model named '{item}' and no bundle at that path (available: {known}).")
        served.append(_model_at(path))
    names = [m.name for m in served]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelBundleError(f"Two served models have the same name: {', '.join(duplicates)}.")
    return served


def _model_at(path: Path) -> ServedModel:
    from covidscan.bundle import read_card
    from covidscan.catalog import ModelEntry

    folder = path.parent if path.is_file() and path.name == "card.json" else path
    card = read_card(folder)
    record = ModelEntry(name=folder.name, path=folder, source="path", card=card).to_dict()
    return ServedModel(folder.name, folder, record)


@dataclass
class ModelRegistry:
    """The served models, loaded in the background; ready once every model has loaded or failed."""

    models: dict[str, ServedModel]
    device: str = "cpu"
    engine: str = "auto"  # ONNX Runtime for classification once exported (see covidscan.engine)
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def ready(self) -> bool:
        """True once loading has finished."""
        return self._ready.is_set()

    def load_all(self) -> None:
        """Load every model's predictor (a failure is kept as that model's error, not raised)."""
        from covidscan.predictor import Predictor

        try:
            for model in self.models.values():
                try:
                    model.predictor = Predictor(model.path, device=self.device, engine=self.engine)
                except CovidscanError as exc:
                    model.error = str(exc)
        finally:
            self._ready.set()

    def start_loading(self) -> threading.Thread:
        """Load in a daemon thread, so the server answers (503 on /healthz) meanwhile."""
        thread = threading.Thread(target=self.load_all, name="covidscan-model-loader", daemon=True)
        thread.start()
        return thread

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished; returns whether it did."""
        return self._ready.wait(timeout)


def env_api_key() -> str | None:
    """The API key required in ``X-API-Key`` (environment variable ``COVIDSCAN_API_KEY``), or None."""
    return os.environ.get(API_KEY_ENV) or None


API_KEY_ENV = "COVIDSCAN_API_KEY"
