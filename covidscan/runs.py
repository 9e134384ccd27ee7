"""Training runs for people: launch options, runs tables, progress and curves.

Pure functions over the job runner's records and run directories (``config.json``,
``metrics.csv``, ``progress.json``, ``model/``); the Train page only lays their results out.

- Launching is :func:`covidscan.training.launch.submit_training` (the whole config goes to the job).
- :func:`runs_table`, :func:`progress_summary`, :func:`curves_frame` and :func:`comparison_frame`
  describe runs as tables (the app draws them: ``app_pages/charts.py``).
- A finished run's report lives in :mod:`covidscan.run_report`; promotion (a run's model offered
  on the Predict page) in :mod:`covidscan.catalog`.

Importing this module is cheap: torch is imported only by the functions that need it.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from covidscan.errors import DatasetError
from covidscan.metric_names import METRIC_NAMES, metric_name, readable_metric_keys

if TYPE_CHECKING:
    from covidscan.jobs import JobRecord
    from covidscan.training import LRFinderResult

CURVE_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr")
#: Runs-table column of the best value of each monitored metric, e.g. "best validation AUC".
BEST_COLUMNS = {key: f"best {metric_name(key)}" for key in ("val_auc", "val_accuracy", "val_f1")}


# ------------------------------------------------------------------------------- launching
def dataset_preview(kind: str, root: str | os.PathLike, **options) -> pd.DataFrame:
    """Images per split and class of a dataset folder (rows: splits, columns: classes, plus total).

    Raises:
        DatasetError: the folder is missing, not of that layout, or holds no images.
    """
    from covidscan.datasets import open_dataset

    dataset = open_dataset(kind, root, **options)
    if not dataset.items:
        raise DatasetError(f"The {kind} dataset at {root} holds no images.")
    classes = list(dataset.classes)
    splits = [s for s in ("train", "val", "test") if any(i.split == s for i in dataset.items)]
    splits += sorted({i.split or "(none)" for i in dataset.items} - set(splits))
    table = pd.DataFrame(0, index=pd.Index(splits, name="split"), columns=classes, dtype="int64")
    for item in dataset.items:
        table.loc[item.split or "(none)", classes[item.label]] += 1
    table["total"] = table.sum(axis=1)
    return table


# ------------------------------------------------------------------------------- run facts
def run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.json`` (empty before training has started or when unreadable)."""
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _arg_value(args: Sequence[str], option: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start:
        return None
    try:
        begin = datetime.fromisoformat(start)
        finish = datetime.fromisoformat(end) if end else datetime.now(timezone.utc)
    except ValueError:
        return None
    return max(0.0, (finish - begin).total_seconds())


def _best(rows: Sequence[dict], key: str) -> float | None:
    values = [row.get(key) for row in rows]
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(finite) if finite else None


def why_not_succeeded(record: JobRecord) -> str | None:
    """For a failed or cancelled job, the reason in words (else None)."""
    from covidscan.jobs import CANCELLED, FAILED, read_progress

    if record.status not in (FAILED, CANCELLED):
        return None
    if record.error:
        return record.error
    progress = read_progress(record.run_dir) or {}
    message = progress.get("message")
    if message:
        return str(message)
    return "Cancelled by the user." if record.status == CANCELLED else "The training process stopped without saying why."


def run_label(record: JobRecord) -> str:
    """How a run is named in lists: its name, plus the id when the name is not the id."""
    return record.name if record.name == record.id else f"{record.name} · {record.id}"


def _default_architecture() -> str:
    from covidscan.models import DEFAULT_ARCHITECTURE

    return DEFAULT_ARCHITECTURE


def run_row(record: JobRecord) -> dict[str, Any]:
    """One runs-table row: status, architecture, image size, epochs, best val metrics, duration, why."""
    from covidscan.jobs import read_metrics, read_progress

    config = run_config(record.run_dir)
    rows = read_metrics(record.run_dir)
    progress = read_progress(record.run_dir) or {}
    arch = config.get("arch") or _arg_value(record.args, "--arch") or _default_architecture()
    sizes = config.get("image_sizes")
    size = (sizes[-1] if sizes else None) or config.get("image_size") or _arg_value(record.args, "--image-size")
    epochs_total = progress.get("epochs") or config.get("epochs") or _arg_value(record.args, "--epochs")
    epochs = f"{len(rows)}/{epochs_total}" if epochs_total else str(len(rows))
    if progress.get("folds"):  # cross-validation: one training run per fold below the run dir, no metrics.csv here
        epochs = f"{progress['folds']} folds × {epochs_total}" if epochs_total else f"{progress['folds']} folds"
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "architecture": arch,
        "image size": int(size) if size not in (None, "") else None,
        "epochs": epochs,
        **{column: _best(rows, key) for key, column in BEST_COLUMNS.items()},
        "duration (s)": _seconds_between(record.started, record.finished),
        "created": record.created,
        "why": why_not_succeeded(record) or "",
    }


def newest_first(records: Sequence[JobRecord]) -> list[JobRecord]:
    """Records newest first; jobs created in the same second keep the runner's (submission) order reversed."""
    return sorted(records, key=lambda r: r.created)[::-1]


def runs_table(records: Sequence[JobRecord]) -> pd.DataFrame:
    """Every job as a row (newest first), for ``st.dataframe``."""
    rows = [run_row(record) for record in newest_first(records)]
    columns = ["name", "status", "architecture", "image size", "epochs", *BEST_COLUMNS.values(),
               "duration (s)", "why", "created", "id"]
    return pd.DataFrame(rows, columns=columns)


def format_seconds(seconds: float | None) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"`` or ``"42 s"`` (``"unknown"`` for None)."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


@dataclass
class ProgressSummary:
    """What the progress bar shows."""

    fraction: float  # 0..1
    text: str


def progress_summary(record: JobRecord, progress: dict[str, Any] | None) -> ProgressSummary:
    """Progress-bar fraction and caption (epoch, step, ETA) of a job from its ``progress.json``."""
    from covidscan.jobs import QUEUED, SUCCEEDED

    if record.status == SUCCEEDED:
        message = readable_metric_keys(str((progress or {}).get("message") or "finished"))
        return ProgressSummary(1.0, message[:1].upper() + message[1:] + ".")
    if record.status == QUEUED:
        return ProgressSummary(0.0, "Waiting for a free slot: another job is running.")
    if not progress:
        return ProgressSummary(0.0, "Starting: loading Python and the dataset…")
    if progress.get("folds"):
        return _cross_validation_progress(progress)
    epochs = int(progress.get("epochs") or 0)
    epoch = int(progress.get("epoch") or 0)
    step = int(progress.get("step") or 0)
    per_epoch = int(progress.get("steps_per_epoch") or 0)
    total = per_epoch * epochs
    fraction = min(1.0, step / total) if total else 0.0
    parts = []
    if epoch and epochs:
        parts.append(f"Epoch {epoch}/{epochs}")
    if total:
        parts.append(f"step {step}/{total}")
    eta = progress.get("eta_seconds")
    if record.status == "running" and eta is not None:
        parts.append(f"about {format_seconds(float(eta))} left")
    message = readable_metric_keys(str(progress.get("message") or ""))
    if message and not message.lower().startswith("epoch"):  # "epoch 3/10, step 2/5" repeats the parts above
        parts.append(message)
    return ProgressSummary(fraction, " · ".join(parts) or "Starting…")


def _cross_validation_progress(progress: dict[str, Any]) -> ProgressSummary:
    """A cross-validation job's progress: its folds in turn, each with its own training run's record inside."""
    folds, fold = int(progress["folds"]), int(progress.get("fold") or 0)
    inner = progress.get("run_progress") or {}
    steps = int(inner.get("steps_per_epoch") or 0) * int(inner.get("epochs") or 0)
    within = min(1.0, int(inner.get("step") or 0) / steps) if steps else 0.0
    parts = [f"Fold {fold}/{folds}"] if fold else []
    if steps and inner.get("epoch"):
        parts.append(f"epoch {int(inner['epoch'])}/{int(inner['epochs'])}")
    message = readable_metric_keys(str(progress.get("message") or ""))
    if message and not message.startswith("training fold"):  # "training fold 2 of 5" repeats the first part
        parts.append(message)
    return ProgressSummary(min(1.0, (max(fold - 1, 0) + within) / folds), " · ".join(parts) or "Starting…")


# ------------------------------------------------------------------------------- curves
def curves_frame(rows: Sequence[dict], run: str = "") -> pd.DataFrame:
    """Per-epoch metrics as a long frame: run, epoch, metric (readable name), value."""
    records = []
    for row in rows:
        for key in CURVE_METRICS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                records.append({"run": run, "epoch": int(row["epoch"]), "metric": METRIC_NAMES[key], "value": float(value)})
    return pd.DataFrame(records, columns=["run", "epoch", "metric", "value"])


def comparison_frame(records: Sequence[JobRecord]) -> pd.DataFrame:
    """The per-epoch curves of several runs in one long frame (``run`` = :func:`run_label`)."""
    from covidscan.jobs import read_metrics

    frames = [curves_frame(read_metrics(record.run_dir), run_label(record)) for record in records]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=["run", "epoch", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def comparison_table(records: Sequence[JobRecord]) -> pd.DataFrame:
    """The runs' settings and best metrics side by side (one column per run)."""
    ordered = newest_first(records)
    table = runs_table(ordered).drop(columns=["created", "name"])
    table.index = [run_label(record) for record in ordered]
    config_rows = []
    for record in ordered:
        config = run_config(record.run_dir)
        config_rows.append({key: config.get(key) for key in ("lr", "batch_size", "augment", "freeze_epochs",
                                                             "balance", "pretrained", "dataset")})
    extra = pd.DataFrame(config_rows, index=table.index)
    return pd.concat([table, extra], axis=1).T.map(_cell_text)


def _cell_text(value: Any) -> str:
    """A table cell as text: "—" for missing, 4 significant digits for fractions."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def lr_finder_frame(result: LRFinderResult) -> pd.DataFrame:
    """The LR range test's curve: lr and smoothed loss per step."""
    return pd.DataFrame({"lr": result.lrs, "loss": result.losses})
