"""Training runs for people: launch options, runs tables, curves, run reports and promotion.

Pure functions over the job runner's records and run directories (``config.json``,
``metrics.csv``, ``progress.json``, ``model/``); the Train page only lays their results out.

- Launching is :func:`covidscan.training.launch.submit_training` (the whole config goes to the job).
- :func:`runs_table`, :func:`progress_summary`, :func:`curves_frame`, :func:`comparison_frame`
  and the ``*_chart`` builders describe runs.
- :func:`run_report` evaluates a finished run's model on its validation split (cached in the run
  directory as ``report.json``), or falls back to what training stored in the model card.
- :func:`promote` copies a run's model into ``STATE_DIR/models/<name>``, where
  :func:`promoted_models` (and so the Predict page's model picker) finds it.

Importing this module is cheap: torch is imported only by the functions that need it.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from covidscan.errors import CovidscanError, DatasetError, JobError, ModelBundleError

if TYPE_CHECKING:
    import altair as alt

    from covidscan.bundle import ModelCard
    from covidscan.jobs import JobRecord
    from covidscan.training import LRFinderResult

MODELS_DIR_NAME = "models"
REPORT_FILE = "report.json"
CURVE_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_auc", "val_f1", "lr")
METRIC_NAMES = {
    "train_loss": "train loss", "val_loss": "val loss", "val_accuracy": "val accuracy", "val_auc": "val AUC",
    "val_f1": "val F1", "lr": "learning rate",
}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "architecture": arch,
        "image size": int(size) if size not in (None, "") else None,
        "epochs": f"{len(rows)}/{epochs_total}" if epochs_total else str(len(rows)),
        "best val AUC": _best(rows, "val_auc"),
        "best val accuracy": _best(rows, "val_accuracy"),
        "best val F1": _best(rows, "val_f1"),
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
    columns = ["name", "status", "architecture", "image size", "epochs", "best val AUC", "best val accuracy",
               "best val F1", "duration (s)", "why", "created", "id"]
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
        message = str((progress or {}).get("message") or "finished")
        return ProgressSummary(1.0, message[:1].upper() + message[1:] + ".")
    if record.status == QUEUED:
        return ProgressSummary(0.0, "Waiting for a free slot: another job is running.")
    if not progress:
        return ProgressSummary(0.0, "Starting: loading Python and the dataset…")
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
    message = str(progress.get("message") or "")
    if message and not message.lower().startswith("epoch"):  # "epoch 3/10, step 2/5" repeats the parts above
        parts.append(message)
    return ProgressSummary(fraction, " · ".join(parts) or "Starting…")


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


def _line_chart(frame: pd.DataFrame, title: str, color: str, log_y: bool = False, height: int = 300,
                legend_columns: int = 2) -> alt.Chart:
    import altair as alt

    scale = alt.Scale(type="log") if log_y else alt.Scale(zero=False)
    # Streamlit fits legend and plot into ``height``: a compact legend above keeps the plot tall.
    return alt.Chart(frame, title=title).mark_line(point=True).encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d"), title="epoch"),
        y=alt.Y("value:Q", scale=scale, title=None),
        color=alt.Color(f"{color}:N", title=None, legend=alt.Legend(orient="top", columns=legend_columns, labelLimit=260,
                                                                   symbolSize=60)),
        tooltip=["run", "epoch", "metric", alt.Tooltip("value:Q", format=".4g")],
    ).properties(height=height)


def loss_chart(curves: pd.DataFrame) -> alt.Chart:
    """Train and val loss per epoch of one run."""
    return _line_chart(curves[curves["metric"].isin(["train loss", "val loss"])], "Loss", "metric")


def metric_chart(curves: pd.DataFrame) -> alt.Chart:
    """Val accuracy, AUC and F1 per epoch of one run."""
    return _line_chart(curves[curves["metric"].isin(["val accuracy", "val AUC", "val F1"])], "Validation metrics", "metric")


def lr_chart(curves: pd.DataFrame) -> alt.Chart:
    """The learning rate at the end of each epoch of one run (log scale)."""
    return _line_chart(curves[curves["metric"] == "learning rate"], "Learning rate", "metric", log_y=True)


def comparison_chart(frame: pd.DataFrame, metric: str) -> alt.Chart:
    """One metric (readable name, e.g. "val AUC") per epoch, one line per run."""
    return _line_chart(frame[frame["metric"] == metric], metric, "run", log_y=metric == "learning rate", height=280,
                       legend_columns=1)


def lr_finder_frame(result: LRFinderResult) -> pd.DataFrame:
    """The LR range test's curve: lr and smoothed loss per step."""
    return pd.DataFrame({"lr": result.lrs, "loss": result.losses})


def lr_finder_chart(result: LRFinderResult) -> alt.Chart:
    """Loss against learning rate (log x), the suggested learning rate marked by a red rule."""
    import altair as alt

    frame = lr_finder_frame(result)
    line = alt.Chart(frame, title="Learning-rate range test").mark_line().encode(
        x=alt.X("lr:Q", scale=alt.Scale(type="log"), title="learning rate"),
        y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="smoothed training loss"),
        tooltip=[alt.Tooltip("lr:Q", format=".2e"), alt.Tooltip("loss:Q", format=".4f")],
    )
    if result.suggestion is None:
        return line.properties(height=300)
    mark = pd.DataFrame({"lr": [result.suggestion], "label": [f"suggested {result.suggestion:.1e}"]})
    rule = alt.Chart(mark).mark_rule(color="#c0392b", strokeDash=[4, 3]).encode(x="lr:Q")
    # The label sits inside the plot's top edge: marks outside it would shrink the plot (Streamlit fits the height).
    text = alt.Chart(mark).mark_text(align="left", baseline="top", dx=4, color="#c0392b").encode(
        x="lr:Q", y=alt.value(4), text="label:N")
    return (line + rule + text).properties(height=300)


# ------------------------------------------------------------------------------- run report
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
        source=f"the best model evaluated on the {split} split", split=split, classes=classes,
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
    names = {"accuracy": "accuracy", "sensitivity": "sensitivity (recall)", "specificity": "specificity",
             "precision": "precision", "f1": "F1", "macro_f1": "macro F1", "auc": "ROC AUC",
             "ece": "calibration error (ECE)", "n": "images"}
    rows = [{"metric": names[key], "value": "n/a" if value is None else (str(value) if key == "n" else f"{value:.3f}")}
            for key, value in report.metrics.items() if key in names]
    return pd.DataFrame(rows, columns=["metric", "value"])


def confusion_frame(report: RunReport) -> pd.DataFrame:
    """The confusion matrix as a long frame: true, predicted, count."""
    rows = [{"true": report.classes[i], "predicted": report.classes[j], "count": int(count)}
            for i, row in enumerate(report.confusion) for j, count in enumerate(row)]
    return pd.DataFrame(rows, columns=["true", "predicted", "count"])


def confusion_chart(report: RunReport) -> alt.Chart:
    """A heat-map of the confusion matrix with the counts written in."""
    import altair as alt

    frame = confusion_frame(report)
    base = alt.Chart(frame, title=f"Confusion matrix ({report.split})").encode(
        x=alt.X("predicted:N", sort=report.classes), y=alt.Y("true:N", sort=report.classes))
    cells = base.mark_rect().encode(color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), legend=None),
                                    tooltip=["true", "predicted", "count"])
    middle = float(frame["count"].max()) / 2 if len(frame) else 0.0
    text = base.mark_text(fontSize=16).encode(
        text="count:Q", color=alt.condition(alt.datum.count > middle, alt.value("white"), alt.value("black")))
    return (cells + text).properties(width=260, height=260)


def roc_frame(report: RunReport) -> pd.DataFrame:
    """ROC curve points: class, fpr, tpr."""
    rows = [{"class": name, "fpr": fpr, "tpr": tpr}
            for name, curve in report.roc.items() for fpr, tpr in zip(curve["fpr"], curve["tpr"])
            if fpr is not None and tpr is not None]
    return pd.DataFrame(rows, columns=["class", "fpr", "tpr"])


def roc_chart(report: RunReport) -> alt.Chart:
    """ROC curve(s) with the chance diagonal."""
    import altair as alt

    frame = roc_frame(report)
    auc = report.metrics.get("auc")
    title = "ROC curve" + (f" (AUC {auc:.3f})" if isinstance(auc, (int, float)) else "")
    curve = alt.Chart(frame, title=title).mark_line(interpolate="step-after").encode(
        x=alt.X("fpr:Q", title="1 - specificity", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("tpr:Q", title="sensitivity", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("class:N", legend=alt.Legend(orient="bottom-right", title=None)),
        order=alt.Order("fpr:Q"),
    )
    chance = alt.Chart(pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]})).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="fpr:Q", y="tpr:Q")
    return (chance + curve).properties(width=300, height=280)


def misclassified_frame(report: RunReport) -> pd.DataFrame:
    """The misclassified images: file, true, predicted, score (probability of the wrong class)."""
    return pd.DataFrame(report.misclassified, columns=["file", "true", "predicted", "score"])


def misclassified_chart(report: RunReport) -> alt.Chart:
    """Histogram of the scores the model gave its wrong answers (high = confidently wrong)."""
    import altair as alt

    frame = misclassified_frame(report)
    return alt.Chart(frame, title=f"Scores of misclassified images ({len(frame)})").mark_bar(color="#c0392b").encode(
        x=alt.X("score:Q", bin=alt.Bin(extent=[0, 1], step=0.05), title="probability of the wrong predicted class"),
        y=alt.Y("count():Q", title="images"),
        tooltip=[alt.Tooltip("count():Q", title="images")],
    ).properties(width=320, height=260)


# ------------------------------------------------------------------------------- promotion
@dataclass(frozen=True)
class PromotedModel:
    """A run's model copied into the promoted-models folder (what the Predict page offers)."""

    name: str
    path: Path
    card: ModelCard


def promoted_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """``STATE_DIR/models``: where promoted models live (STATE_DIR as the job runner's)."""
    from covidscan.jobs import default_state_dir

    return (Path(state_dir) if state_dir is not None else default_state_dir()) / MODELS_DIR_NAME


def check_model_name(name: str) -> str:
    """The name, stripped, if it is usable as a folder name; else JobError saying what is allowed."""
    name = (name or "").strip()
    if not _NAME_PATTERN.match(name):
        raise JobError("A model name needs 1 to 64 letters, digits, dots, dashes or underscores, "
                       f"starting with a letter or digit (not {name!r}).")
    return name


def promote(run: JobRecord | str | os.PathLike, name: str, state_dir: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Copy a finished run's model into ``STATE_DIR/models/<name>`` so the Predict page offers it.

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


def promoted_models(state_dir: str | os.PathLike | None = None) -> list[PromotedModel]:
    """The promoted models, newest first; damaged folders are skipped."""
    from covidscan.bundle import CARD_FILE, read_card

    folder = promoted_dir(state_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not (path / CARD_FILE).is_file():
            continue
        try:
            card = read_card(path)
        except ModelBundleError:
            continue
        found.append(((path / CARD_FILE).stat().st_mtime, PromotedModel(path.name, path, card)))
    return [model for _, model in sorted(found, key=lambda item: -item[0])]
