"""The run report: a finished training run's validation results, for the Train page.

:func:`run_report` evaluates a run's best model on the validation split it was trained against
(cached in the run directory as ``report.json``), or falls back to what training stored in the
model card. A cross-validation run (its model's card carries ``metrics.estimate``) is reported
from its out-of-fold predictions instead (``model/oof.csv``): its fold ensemble, or its refit, trained
on the validation images, so evaluating it there would flatter it. The ``*_frame`` and
:func:`report_metric_table` helpers turn a :class:`RunReport` into tables; the app draws them
(``app_pages/charts.py``).

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
#: Raised when the report changes what it holds or where it comes from: an older report.json is made again.
REPORT_VERSION = 2
#: The ``split`` of a report made from out-of-fold predictions.
OUT_OF_FOLD = "out-of-fold"
#: The metric table's interval column (only for reports that have intervals).
CI_COLUMN = "95% CI"


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
        intervals: 95% interval ``[low, high]`` per metric key (cross-validation runs; else empty).
        reliability: the reliability diagram, one dict per non-empty confidence bin
            (:func:`covidscan.evaluation.reliability_bins`: low, high, confidence, accuracy, count).
        protocol: how the figures were obtained, in a sentence (cross-validation runs).
        version: :data:`REPORT_VERSION` of the code that made it.
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
    intervals: dict[str, list[float]] = field(default_factory=dict)
    reliability: list[dict[str, Any]] = field(default_factory=list)
    protocol: str | None = None
    version: int = REPORT_VERSION


REPORT_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "macro_f1", "auc", "ece", "n")


def _roc_curves(result: dict) -> dict[str, dict[str, list]]:
    """:func:`covidscan.evaluation.compute_metrics`'s ROC points, per class (binary: the positive class)."""
    roc = result.get("roc") or {}
    if len(result["classes"]) == 2:
        roc = {result["positive_class"]: roc} if roc else {}
    return {name: {"fpr": points["fpr"], "tpr": points["tpr"]} for name, points in roc.items() if points}


def _report_from_evaluation(result: dict, card: ModelCard, split: str) -> RunReport:
    wrong = [{"file": m["file"], "true": m["true"], "predicted": m["predicted"],
              "score": float(m["probabilities"][m["predicted"]])} for m in result.get("misclassified", [])]
    return RunReport(
        source=f"the best model evaluated on the {split_name(split)} split", split=split, classes=list(result["classes"]),
        metrics={key: result.get(key) for key in REPORT_METRICS}, confusion=result["confusion_matrix"],
        roc=_roc_curves(result), misclassified=wrong, weights_sha256=card.weights_sha256,
        reliability=list(result.get("reliability") or []),
    )


def _cross_validation_design(card: ModelCard) -> str:
    """E.g. "5-fold cross-validation" or "5-fold cross-validation repeated 2x", from the card's training record."""
    record = (card.training or {}).get("cross_validation") or {}
    folds, repeats = record.get("folds"), record.get("repeats") or 1
    design = f"{folds}-fold cross-validation" if folds else "cross-validation"
    return design + (f" repeated {repeats}x" if repeats > 1 else "")


def _report_from_oof(card: ModelCard, model_dir: Path, estimate: dict) -> RunReport:
    """The report of a cross-validated model: its card's out-of-fold estimate, plus curves from ``oof.csv``.

    The metrics and intervals are the card's; the confusion matrix, ROC, reliability diagram and
    misclassified images are recomputed from the stored OOF logits exactly as the estimate was
    (cross-fitted temperature, repeats averaged per image, argmax decisions).
    """
    import hashlib

    from covidscan.oof import OOF_FILE, cross_fitted_probabilities, parse_oof_csv, per_image
    from covidscan.decision import decide
    from covidscan.evaluation import compute_metrics, reliability_bins

    n, groups = estimate.get("n"), estimate.get("groups")
    report = RunReport(
        source=f"out-of-fold predictions of {_cross_validation_design(card)} ({n} images, {groups} groups)",
        split=OUT_OF_FOLD, classes=list(card.classes), metrics={key: estimate.get(key) for key in REPORT_METRICS},
        confusion=estimate.get("confusion_matrix") or [], weights_sha256=card.weights_sha256,
        intervals={key: [float(low), float(high)] for key, (low, high) in (estimate.get("ci95") or {}).items()
                   if key in REPORT_METRICS},
        protocol=estimate.get("protocol"))
    try:
        text = (model_dir / OOF_FILE).read_text(encoding="utf-8")
        rows, classes = parse_oof_csv(text)
    except (OSError, UnicodeDecodeError, ValueError, IndexError, StopIteration) as exc:
        report.note = (f"The out-of-fold predictions ({OOF_FILE}) could not be read ({exc.__class__.__name__}): "
                       "no ROC curve or reliability diagram, only the estimate stored in the model card.")
        return report
    stored = (estimate.get("predictions") or {}).get("sha256")
    if classes != list(card.classes) or not rows or (stored and hashlib.sha256(text.encode()).hexdigest() != stored):
        report.note = (f"The model's {OOF_FILE} is not the one its estimate was made from: no ROC curve or reliability "
                       "diagram, only the estimate stored in the model card.")
        return report
    paths, labels, probs, _ = per_image(rows, cross_fitted_probabilities(rows))
    positive = estimate.get("positive_class") or card.positive_class
    result = compute_metrics(labels, probs, card.classes, positive)  # no threshold: argmax, as the estimate
    predicted = decide(probs, card.classes)
    report.confusion = result["confusion_matrix"]
    report.roc = _roc_curves(result)
    report.reliability = reliability_bins(labels, probs)
    report.misclassified = [{"file": path, "true": card.classes[t], "predicted": card.classes[p], "score": float(row[p])}
                            for path, t, p, row in zip(paths, labels, predicted, probs) if t != p]
    return report


def _report_from_card(card: ModelCard, note: str) -> RunReport:
    split, values = next(iter((card.metrics or {}).items()), ("val", {}))
    values = values if isinstance(values, dict) else {}
    return RunReport(
        source="the metrics training stored in the model card", split=split, classes=list(card.classes),
        metrics={key: values.get(key) for key in REPORT_METRICS}, confusion=values.get("confusion_matrix") or [],
        weights_sha256=card.weights_sha256, note=note,
    )


def run_report(run_dir: str | os.PathLike, evaluate: bool = True, device: str = "cpu") -> RunReport:
    """The report of a finished run: metrics, confusion matrix, ROC, reliability diagram and misclassified scores.

    The run's best model is evaluated (with :func:`covidscan.evaluation.evaluate_bundle`) on the
    validation split it was trained against; the result is kept in ``report.json`` in the run
    directory, so it is computed once per model (a report.json of an older :data:`REPORT_VERSION`
    is made again, and still used when that fails). If the dataset is gone (or ``evaluate`` is
    False) the card's stored validation metrics are used, without ROC or misclassified scores.
    A cross-validation run (``covidscan cv``: its card carries ``metrics.estimate``) is reported
    from its out-of-fold predictions, with the estimate's 95% intervals; no image is read.

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
    if cached is not None and cached.version == REPORT_VERSION:
        return cached
    estimate = (card.metrics or {}).get("estimate")
    if isinstance(estimate, dict):  # cross-validated: never evaluated on images it trained on
        report = _report_from_oof(card, model_dir, estimate)
        _write_json_atomic(run_dir / REPORT_FILE, asdict(report))
        return report
    if not evaluate:
        return cached or _report_from_card(card, "The model was not evaluated here.")
    config = run_config(run_dir)
    dataset, root = config.get("dataset"), config.get("root")
    split = config.get("val_split") or "val"
    if not dataset or not root:
        return cached or _report_from_card(card, "The run's configuration does not say which dataset it used.")
    from covidscan.evaluation import evaluate_bundle

    try:
        result = evaluate_bundle(model_dir, dataset, root, split=split, device=device,
                                 dataset_options=config.get("dataset_options") or {})
    except CovidscanError as exc:
        # An older report of this very model still holds; it only lacks what later versions added.
        return cached or _report_from_card(card, f"The validation images could not be read again ({exc}); "
                                                 "showing the numbers stored at training time.")
    report = _report_from_evaluation(result, card, split)
    _write_json_atomic(run_dir / REPORT_FILE, asdict(report))
    return report


def is_cross_validated(run_dir: str | os.PathLike) -> bool:
    """Whether the run's model is cross-validated (its report comes from out-of-fold predictions)."""
    from covidscan.bundle import read_card

    try:
        card = read_card(Path(run_dir) / "model")
    except (CovidscanError, OSError, ValueError):
        return False
    return isinstance((card.metrics or {}).get("estimate"), dict)


def _read_cached_report(path: Path, weights_sha256: str) -> RunReport | None:
    """The cached report of this model, of any version (None when missing, unreadable or of another model)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.setdefault("version", 1)  # written before reports had a version
        report = RunReport(**data)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return report if report.weights_sha256 == weights_sha256 else None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only run folder only means no cache


def _value_text(key: str, value: Any) -> str:
    return "n/a" if value is None else (str(value) if key == "n" else f"{value:.3f}")


def report_metric_table(report: RunReport) -> pd.DataFrame:
    """The report's metrics as a table: metric, value, and a "95% CI" column when the report has intervals."""
    columns = ["metric", "value"] + ([CI_COLUMN] if report.intervals else [])
    rows = []
    for key, value in report.metrics.items():
        if key not in REPORT_METRICS:
            continue
        row = {"metric": METRIC_NAMES[key], "value": _value_text(key, value)}
        if report.intervals:
            interval = report.intervals.get(key)
            row[CI_COLUMN] = f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else ("" if key == "n" else "—")
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def reliability_frame(report: RunReport) -> pd.DataFrame:
    """The reliability diagram as a table: confidence bin, mean confidence, accuracy, images (non-empty bins)."""
    rows = [{"confidence bin": f"({row['low']:.2f}, {row['high']:.2f}]", "mean confidence": row["confidence"],
             "accuracy": row["accuracy"], "images": int(row["count"])} for row in report.reliability]
    return pd.DataFrame(rows, columns=["confidence bin", "mean confidence", "accuracy", "images"])


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

