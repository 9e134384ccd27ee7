"""The run report: a finished training run's validation results, for the Train page.

:func:`run_report` evaluates a run's best model on the validation split it was trained against
(cached in the run directory as ``report.json``), or falls back to what training stored in the
model card. The ``*_frame`` and :func:`report_metric_table` helpers turn a :class:`RunReport`
into tables; the app draws them (``app_pages/charts.py``).

Importing this module is cheap: torch is imported only when a model is evaluated.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from covidscan.errors import CovidscanError, ModelBundleError
from covidscan.metric_names import METRIC_NAMES, split_name
from covidscan.runs import run_config

if TYPE_CHECKING:
    from covidscan.bundle import ModelCard


REPORT_FILE = "report.json"


@dataclass
class RunReport:
    """A finished run's validation results, for the run report.

    Attributes:
        source: where the numbers come from, in words.
        split: the split they describe.
        classes: the model's classes (confusion-matrix order).
        metrics: accuracy, sensitivity, specificity, precision, f1, auc, ece, n (None when unknown).
        confusion: rows = true class, columns = predicted class.
        roc: ROC curve points per class (fpr, tpr lists); empty when not available.
        misclassified: one dict per wrong image: file, true, predicted, score (the wrong class's probability).
        weights_sha256: which model the numbers belong to.
        note: why some parts are missing, if they are.
    """

    source: str
    split: str
    classes: list[str]
    metrics: dict[str, Any]
    confusion: list[list[int]]
    roc: dict[str, dict[str, list]] = field(default_factory=dict)
    misclassified: list[dict[str, Any]] = field(default_factory=list)
    weights_sha256: str = ""
    note: str | None = None


REPORT_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "macro_f1", "auc", "ece", "n")


def _report_from_evaluation(result: dict, card: ModelCard, split: str) -> RunReport:
    classes = list(result["classes"])
    roc = result.get("roc") or {}
    if len(classes) == 2:
        roc = {result["positive_class"]: roc} if roc else {}
    curves = {name: {"fpr": points["fpr"], "tpr": points["tpr"]} for name, points in roc.items() if points}
    wrong = [{"file": m["file"], "true": m["true"], "predicted": m["predicted"],
              "score": float(m["probabilities"][m["predicted"]])} for m in result.get("misclassified", [])]
    return RunReport(
        source=f"the best model evaluated on the {split_name(split)} split", split=split, classes=classes,
        metrics={key: result.get(key) for key in REPORT_METRICS}, confusion=result["confusion_matrix"],
        roc=curves, misclassified=wrong, weights_sha256=card.weights_sha256,
    )


def _report_from_card(card: ModelCard, note: str) -> RunReport:
    split, values = next(iter((card.metrics or {}).items()), ("val", {}))
    values = values if isinstance(values, dict) else {}
    return RunReport(
        source="the metrics training stored in the model card", split=split, classes=list(card.classes),
        metrics={key: values.get(key) for key in REPORT_METRICS}, confusion=values.get("confusion_matrix") or [],
        weights_sha256=card.weights_sha256, note=note,
    )


def run_report(run_dir: str | os.PathLike, evaluate: bool = True, device: str = "cpu") -> RunReport:
    """The report of a finished run: metrics, confusion matrix, ROC and misclassified scores.

    The run's best model is evaluated (with :func:`covidscan.evaluation.evaluate_bundle`) on the
    validation split it was trained against; the result is kept in ``report.json`` in the run
    directory, so it is computed once per model. If the dataset is gone (or ``evaluate`` is
    False) the card's stored validation metrics are used, without ROC or misclassified scores.

    Args:
        run_dir: the run directory (with ``model/`` and ``config.json``).
        evaluate: run the model over the validation split when there is no cached report.
        device: where to evaluate.

    Returns:
        The report.

    Raises:
        ModelBundleError: the run has no usable model.
    """
    from covidscan.bundle import read_card

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "card.json").is_file():
        raise ModelBundleError("This run has no saved model (it did not finish an epoch).")
    card = read_card(model_dir)
    cached = _read_cached_report(run_dir / REPORT_FILE, card.weights_sha256)
    if cached is not None:
        return cached
    if not evaluate:
        return _report_from_card(card, "The model was not evaluated here.")
    config = run_config(run_dir)
    dataset, root = config.get("dataset"), config.get("root")
    split = config.get("val_split") or "val"
    if not dataset or not root:
        return _report_from_card(card, "The run's configuration does not say which dataset it used.")
    from covidscan.evaluation import evaluate_bundle

    try:
        result = evaluate_bundle(model_dir, dataset, root, split=split, device=device,
                                 dataset_options=config.get("dataset_options") or {})
    except CovidscanError as exc:
        return _report_from_card(card, f"The validation images could not be read again ({exc}); "
                                       "showing the numbers stored at training time.")
    report = _report_from_evaluation(result, card, split)
    _write_json_atomic(run_dir / REPORT_FILE, asdict(report))
    return report


def _read_cached_report(path: Path, weights_sha256: str) -> RunReport | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = RunReport(**data)
    except (OSError, ValueError, TypeError):
        return None
    return report if report.weights_sha256 == weights_sha256 else None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only run folder only means no cache


def report_metric_table(report: RunReport) -> pd.DataFrame:
    """The report's metrics as a two-column table (metric, value)."""
    rows = [{"metric": METRIC_NAMES[key], "value": "n/a" if value is None else (str(value) if key == "n" else f"{value:.3f}")}
            for key, value in report.metrics.items() if key in REPORT_METRICS]
    return pd.DataFrame(rows, columns=["metric", "value"])


def confusion_frame(report: RunReport) -> pd.DataFrame:
    """The confusion matrix as a long frame: true, predicted, count."""
    rows = [{"true": report.classes[i], "predicted": report.classes[j], "count": int(count)}
            for i, row in enumerate(report.confusion) for j, count in enumerate(row)]
    return pd.DataFrame(rows, columns=["true", "predicted", "count"])


def roc_frame(report: RunReport) -> pd.DataFrame:
    """ROC curve points: class, fpr, tpr."""
    rows = [{"class": name, "fpr": fpr, "tpr": tpr}
            for name, curve in report.roc.items() for fpr, tpr in zip(curve["fpr"], curve["tpr"])
            if fpr is not None and tpr is not None]
    return pd.DataFrame(rows, columns=["class", "fpr", "tpr"])


def misclassified_frame(report: RunReport) -> pd.DataFrame:
    """The misclassified images: file, true, predicted, score (probability of the wrong class)."""
    return pd.DataFrame(report.misclassified, columns=["file", "true", "predicted", "score"])

