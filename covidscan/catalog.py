"""The model catalog: every model covidscan can offer, found in one place.

Three folders hold models, each listed newest or alphabetically, and always in this order:

- **shipped**: the bundles in the repository's ``weights/`` folder (or ``$COVIDSCAN_WEIGHTS_DIR``);
- **promoted**: training runs copied into ``STATE_DIR/models/<name>`` by :func:`promote`
  (the Train page's "Make available on the Predict page" button);
- **training run**: finished runs of ``covidscan train --out runs/<name>`` under ``./runs``
  (or ``$COVIDSCAN_RUNS_DIR``).

:func:`available_models` lists them all as :class:`ModelEntry` (the app's model picker and
``covidscan models`` show the same list), and :func:`find_model` turns what a user typed, a
catalog name or a bundle folder, into one entry (``covidscan predict --model``).

Listing reads only the cards (``card.json``), never the weights; a damaged bundle is skipped
rather than hiding the others.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidscan.errors import JobError, ModelBundleError

if TYPE_CHECKING:
    from covidscan.bundle import ModelCard
    from covidscan.jobs import JobRecord

#: Where a model comes from (:attr:`ModelEntry.source`).
SHIPPED, PROMOTED, TRAINING_RUN, PATH = "shipped", "promoted", "training run", "path"
#: Override the folder of shipped models (e.g. in a container) with this environment variable.
WEIGHTS_ENV = "COVIDSCAN_WEIGHTS_DIR"
#: Folder of training runs whose finished bundles are offered (default: ./runs).
RUNS_ENV = "COVIDSCAN_RUNS_DIR"
#: Sub-folder of the job runner's state directory that holds promoted models.
MODELS_DIR_NAME = "models"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelEntry:
    """One model bundle, described by its card (the weights are not loaded).

    Attributes:
        name: what users call it: the folder name (a run's folder name for training runs).
        path: the bundle folder (the one holding ``card.json``).
        source: :data:`SHIPPED`, :data:`PROMOTED`, :data:`TRAINING_RUN` or :data:`PATH` (typed by the user).
        card: the validated model card.
    """

    name: str
    path: Path
    source: str
    card: ModelCard

    @property
    def label(self) -> str:
        """How a model picker lists it, e.g. ``ct-covid (CT)`` or ``run-3 (CT, training run)``."""
        where = {SHIPPED: "", PATH: f", {self.path}"}.get(self.source, f", {self.source}")
        return f"{self.name} ({self.card.modality}{where})"

    def to_dict(self) -> dict[str, Any]:
        """The ``covidscan models --json`` record: name, path, source and the card's main facts."""
        card = self.card
        return {"name": self.name, "path": str(self.path), "source": self.source, "modality": card.modality,
                "classes": card.classes, "architecture": card.architecture, "ensemble_size": card.ensemble_size,
                "input_size": card.input_size, "metrics": card.metrics, "description": card.description}


# ------------------------------------------------------------------------------- folders
def weights_dir() -> Path:
    """The folder holding the shipped model bundles: ``$COVIDSCAN_WEIGHTS_DIR``, else ``weights/``."""
    return Path(os.environ.get(WEIGHTS_ENV) or Path(__file__).resolve().parent.parent / "weights")


def promoted_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """``STATE_DIR/models``: where promoted models live (STATE_DIR as the job runner's)."""
    from covidscan.jobs import default_state_dir

    return (Path(state_dir) if state_dir is not None else default_state_dir()) / MODELS_DIR_NAME


def runs_dir() -> Path | None:
    """Where finished training runs live: ``$COVIDSCAN_RUNS_DIR``, else ``./runs`` if it exists."""
    configured = os.environ.get(RUNS_ENV)
    if configured:
        return Path(configured)
    default = Path.cwd() / "runs"
    return default if default.is_dir() else None


# ------------------------------------------------------------------------------- listing
def _card_or_none(folder: Path) -> ModelCard | None:
    from covidscan.bundle import read_card

    try:
        return read_card(folder)
    except ModelBundleError:
        return None


def _newest_first(found: list[tuple[float, ModelEntry]]) -> list[ModelEntry]:
    return [entry for _, entry in sorted(found, key=lambda item: -item[0])]


def shipped_models(folder: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Every valid bundle directly under ``folder`` (default :func:`weights_dir`), sorted by name."""
    from covidscan.bundle import CARD_FILE

    root = Path(folder) if folder is not None else weights_dir()
    found = []
    for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
        card = _card_or_none(card_path.parent)
        if card is not None:
            found.append(ModelEntry(card_path.parent.name, card_path.parent, SHIPPED, card))
    return found


def promoted_models(state_dir: str | os.PathLike | None = None) -> list[ModelEntry]:
    """The promoted models (see :func:`promote`), newest first."""
    from covidscan.bundle import CARD_FILE

    folder = promoted_dir(state_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not (path / CARD_FILE).is_file():
            continue  # dot-folders are save_bundle's half-written copies
        card = _card_or_none(path)
        if card is not None:
            found.append(((path / CARD_FILE).stat().st_mtime, ModelEntry(path.name, path, PROMOTED, card)))
    return _newest_first(found)


def training_run_models(root: str | os.PathLike | None = None) -> list[ModelEntry]:
    """The bundles of finished training runs under ``root`` (default :func:`runs_dir`), newest first.

    A run is a folder with ``model/card.json``; one whose ``progress.json`` says it has not
    succeeded (still running, failed, cancelled) is left out. A plain bundle folder directly
    under ``root`` is offered too.

    Args:
        root: the runs folder.

    Returns:
        The entries, named by their run folder.
    """
    from covidscan.bundle import CARD_FILE
    from covidscan.jobs.base import read_progress

    root = Path(root) if root is not None else runs_dir()
    if root is None or not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        bundle = folder / "model" if (folder / "model" / CARD_FILE).is_file() else folder
        if not (bundle / CARD_FILE).is_file():
            continue
        # A run folder still being written, or one that failed, offers no model.
        if (folder / "progress.json").is_file() and (read_progress(folder) or {}).get("state") != "succeeded":
            continue
        card = _card_or_none(bundle)
        if card is not None:
            found.append(((bundle / CARD_FILE).stat().st_mtime, ModelEntry(folder.name, bundle, TRAINING_RUN, card)))
    return _newest_first(found)


def available_models(weights: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
                     runs: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Every model on offer: shipped, then promoted, then finished training runs.

    Args:
        weights: the shipped-models folder (default :func:`weights_dir`).
        state_dir: the job runner's state directory (default the runner's).
        runs: the training-runs folder (default :func:`runs_dir`).

    Returns:
        The entries, in the order a model picker lists them.
    """
    return shipped_models(weights) + promoted_models(state_dir) + training_run_models(runs)


def model_from_path(path: str | os.PathLike) -> ModelEntry:
    """The bundle in a folder the user named.

    Raises:
        ModelBundleError: the folder is not a readable bundle (the message says what is wrong).
    """
    from covidscan.bundle import read_card

    folder = Path(str(path).strip()).expanduser()
    return ModelEntry(folder.name, folder, PATH, read_card(folder))


def find_model(name_or_path: str | os.PathLike, **folders: Any) -> ModelEntry:
    """The model a user means: an existing bundle folder, else the first catalog entry of that name.

    Args:
        name_or_path: a bundle folder, or a name :func:`available_models` lists.
        folders: ``weights``, ``state_dir`` or ``runs`` for :func:`available_models`.

    Returns:
        The entry (source :data:`PATH` for a folder).

    Raises:
        ModelBundleError: neither a bundle folder nor a known name, or a damaged bundle.
    """
    text = str(name_or_path).strip()
    if Path(text).expanduser().exists():
        return model_from_path(text)
    entries = available_models(**folders)
    match = next((entry for entry in entries if entry.name == text), None)
    if match is not None:
        return match
    names = ", ".join(entry.name for entry in entries) or "none installed"
    raise ModelBundleError(f"No model bundle at {text}, and no model of that name (models: {names}; "
                           "`covidscan models` lists them).")


def model_path(name_or_path: str | os.PathLike, **folders: Any) -> Path:
    """Where to load a model from: an existing path as given, else the folder of the catalog name.

    An existing path is passed on unread, so :func:`covidscan.bundle.load_bundle` accepts what it
    always has (a bundle folder, its ``card.json``, a ``.pt`` checkpoint) and reports its own errors.

    Raises:
        ModelBundleError: neither an existing path nor a known name.
    """
    path = Path(str(name_or_path).strip()).expanduser()
    return path if path.exists() else find_model(name_or_path, **folders).path


# ------------------------------------------------------------------------------- promotion
def check_model_name(name: str) -> str:
    """The name, stripped, if it is usable as a folder name; else JobError saying what is allowed."""
    name = (name or "").strip()
    if not _NAME_PATTERN.match(name):
        raise JobError("A model name needs 1 to 64 letters, digits, dots, dashes or underscores, "
                       f"starting with a letter or digit (not {name!r}).")
    return name


def promote(run: JobRecord | str | os.PathLike, name: str, state_dir: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Copy a finished run's model into ``STATE_DIR/models/<name>`` so the catalog offers it.

    The copy is a fresh bundle (written atomically by :func:`covidscan.bundle.save_bundle`) whose
    card carries the new name and where it came from; the run directory is left untouched.

    Args:
        run: the job record or its run directory.
        name: the model's name (folder name and card name).
        state_dir: the job state directory (default the runner's).
        overwrite: replace a promoted model of the same name.

    Returns:
        The promoted bundle's folder.

    Raises:
        JobError: a bad name, a name already taken, or a run that has not succeeded.
        ModelBundleError: the run's model cannot be read.
    """
    from covidscan.bundle import load_bundle, save_bundle
    from covidscan.jobs import SUCCEEDED, read_progress

    name = check_model_name(name)
    run_dir = Path(run.run_dir) if hasattr(run, "run_dir") else Path(run)
    status = getattr(run, "status", None) or (read_progress(run_dir) or {}).get("state")
    if status != SUCCEEDED:
        raise JobError(f"Only a run that succeeded can be promoted (this one is {status or 'not started'}).")
    target = promoted_dir(state_dir) / name
    if target.exists() and not overwrite:
        raise JobError(f"A promoted model named {name!r} exists already: choose another name.")
    bundle = load_bundle(run_dir / "model")
    card = bundle.card
    card.training = {**(card.training or {}), "promoted_from": {
        "run": run_dir.name, "name": getattr(run, "name", run_dir.name), "original_name": card.name,
        "promoted": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    card.name = name
    card.created = ""  # save_bundle stamps the promotion time
    return save_bundle(bundle.model, card, target)
