"""covidscan.runs on a real tiny training run: launch arguments, runs table, progress, curves, run
report (promotion: test_catalog.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from jobs_helpers import make_dataset, metrics_csv

from app_pages import charts
from covidscan import run_report, runs
from covidscan.errors import DatasetError, ModelBundleError
from covidscan.evaluation import calibration_error
from covidscan.jobs import JobRecord
from covidscan.models import DEFAULT_ARCHITECTURE
from covidscan.training import TrainConfig, train

STARTED, FINISHED = "2026-01-02T10:00:00+00:00", "2026-01-02T10:01:30+00:00"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "folder")


def tiny_config(root: Path, **changes) -> TrainConfig:
    options = dict(dataset="folder", root=str(root), arch="tiny_cnn", epochs=2, image_size=64, batch_size=4,
                   device="cpu", seed=1)
    options.update(changes)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    """A real 2-epoch tiny_cnn run directory (written by covidscan.training.train)."""
    folder = tmp_path_factory.mktemp("state") / "runs" / "20260102-100000-abcdef"
    result = train(tiny_config(data), folder)
    assert result.state == "succeeded"
    return folder


def record(run_dir: Path, status: str = "succeeded", **changes) -> JobRecord:
    fields = dict(id=run_dir.name, name="ct run", status=status, created=STARTED, run_dir=str(run_dir),
                  backend="local", args=["--arch", "tiny_cnn"], started=STARTED, finished=FINISHED)
    fields.update(changes)
    return JobRecord(**fields)


# ------------------------------------------------------------------ launching
def test_dataset_preview_counts_images_per_split_and_class(data, tmp_path):
    table = runs.dataset_preview("folder", data, val_fraction=0.25)
    assert list(table.index) == ["train", "val"] and list(table.columns) == ["Covid", "Normal", "total"]
    assert table["Covid"].sum() == 8 and table["Normal"].sum() == 8  # every file written, once
    assert table.loc["val", "total"] == 4 and table.loc["train", "total"] == 12
    with pytest.raises(DatasetError, match="does not exist"):
        runs.dataset_preview("folder", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        runs.dataset_preview("covid-ct", tmp_path / "empty")


# ------------------------------------------------------------------ runs table and progress
def test_runs_table_reads_config_metrics_and_reasons(run_dir, tmp_path):
    rows = metrics_csv(run_dir)
    failed_dir = tmp_path / "failed"
    failed_dir.mkdir()
    cancelled_dir = tmp_path / "cancelled"
    cancelled_dir.mkdir()
    (cancelled_dir / "progress.json").write_text(json.dumps({"state": "cancelled", "message": "cancelled by the user"}))
    jobs = [
        record(run_dir),
        record(failed_dir, "failed", id="f", name="f", created="2026-01-03T00:00:00+00:00",
               args=["--arch", "resnet18", "--image-size", "128", "--epochs", "4"],
               error="The dataset folder /x does not exist or is not a folder."),
        record(cancelled_dir, "cancelled", id="c", name="c", created="2026-01-01T00:00:00+00:00", error=None),
    ]
    table = runs.runs_table(jobs)
    assert list(table["id"]) == ["f", run_dir.name, "c"]  # newest first
    done = table.set_index("id").loc[run_dir.name]
    assert (done["architecture"], done["image size"], done["epochs"]) == ("tiny_cnn", 64, "2/2")
    assert done["best validation AUC"] == max(float(r["val_auc"]) for r in rows)
    assert done["best validation accuracy"] == max(float(r["val_accuracy"]) for r in rows)
    assert done["best validation F1"] == max(float(r["val_f1"]) for r in rows)
    assert done["duration (s)"] == 90.0 and done["why"] == ""
    failed = table.set_index("id").loc["f"]
    assert (failed["architecture"], failed["image size"], failed["epochs"]) == ("resnet18", 128, "0/4")
    assert "does not exist" in failed["why"] and pd.isna(failed["best validation AUC"])
    assert table.set_index("id").loc["c", "why"] == "cancelled by the user"
    # A cross-validation job has no metrics.csv of its own: its epochs column says how many folds of how many epochs.
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    (cv_dir / "progress.json").write_text(json.dumps({"state": "succeeded", "fold": 3, "folds": 3}))
    cv = runs.run_row(record(cv_dir, args=["cv", "--arch", "tiny_cnn", "--epochs", "2", "--folds", "3"]))
    assert (cv["architecture"], cv["epochs"]) == ("tiny_cnn", "3 folds × 2")


def test_progress_summary_and_durations(run_dir):
    running = record(run_dir, "running", finished=None)
    summary = runs.progress_summary(running, {"state": "running", "epoch": 2, "epochs": 4, "step": 6,
                                              "steps_per_epoch": 3, "eta_seconds": 65.0, "message": ""})
    assert summary.fraction == 0.5
    assert summary.text == "Epoch 2/4 · step 6/12 · about 1 min 05 s left"
    assert runs.progress_summary(running, None).fraction == 0.0
    # A cross-validation job: fold 2 of 4, its own run half-way through its steps.
    fold = runs.progress_summary(running, {"state": "running", "fold": 2, "folds": 4, "message": "training fold 2 of 4",
                                           "run_progress": {"epoch": 1, "epochs": 2, "step": 3, "steps_per_epoch": 3}})
    assert fold.fraction == pytest.approx(1.5 / 4) and fold.text == "Fold 2/4 · epoch 1/2"
    last = runs.progress_summary(running, {"fold": 4, "folds": 4, "message": "estimating from out-of-fold predictions",
                                           "run_progress": {"epoch": 2, "epochs": 2, "step": 6, "steps_per_epoch": 3}})
    assert last.fraction == 1.0 and last.text == "Fold 4/4 · epoch 2/2 · estimating from out-of-fold predictions"
    assert "Waiting" in runs.progress_summary(record(run_dir, "queued"), None).text
    done = runs.progress_summary(record(run_dir), json.loads((run_dir / "progress.json").read_text()))
    assert done.fraction == 1.0 and done.text.startswith("Finished: best validation AUC")
    assert [runs.format_seconds(s) for s in (None, 42, 185, 3720)] == ["unknown", "42 s", "3 min 05 s", "1 h 02 min"]


def test_curves_and_comparison_follow_metrics_csv(run_dir, tmp_path):
    rows = metrics_csv(run_dir)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    frame = runs.comparison_frame([record(run_dir), record(empty_dir, "running", id="e", name="e")])
    assert set(frame["run"]) == {f"ct run · {run_dir.name}"}  # a run without epochs adds no rows
    val_auc = frame[frame["metric"] == "validation AUC"].sort_values("epoch")
    assert list(val_auc["value"]) == [float(r["val_auc"]) for r in rows]
    assert set(frame["metric"]) == {runs.METRIC_NAMES[key] for key in runs.CURVE_METRICS}
    chart = charts.comparison_chart(frame, "validation AUC").to_dict()
    assert chart["encoding"]["color"]["field"] == "run"
    from covidscan.jobs import read_metrics

    curves = runs.curves_frame(read_metrics(run_dir), "one")
    assert len(curves) == len(rows) * len(runs.CURVE_METRICS)
    assert charts.loss_chart(curves).to_dict()["title"] == "Loss"
    table = runs.comparison_table([record(run_dir), record(empty_dir, "running", id="e", name="e", created=FINISHED,
                                                          args=[])])
    assert list(table.columns) == ["e", f"ct run · {run_dir.name}"]
    assert table.loc["architecture"].tolist() == [DEFAULT_ARCHITECTURE, "tiny_cnn"]  # "e": no config, no --arch
    assert table.loc["lr"].tolist() == ["—", "0.001"]
    assert table.loc["best validation AUC"].tolist() == ["—", f"{max(float(r['val_auc']) for r in rows):.4g}"]


# ------------------------------------------------------------------ run report
def test_run_report_evaluates_the_best_model_on_val_and_caches_it(run_dir, monkeypatch):
    from covidscan.bundle import read_card

    (run_dir / run_report.REPORT_FILE).unlink(missing_ok=True)
    report = run_report.run_report(run_dir)
    card = read_card(run_dir / "model")
    stored = card.metrics["val"]
    assert report.source.startswith("the best model evaluated on the validation split") and report.note is None
    # Evaluating the saved bundle again gives the numbers training stored for it.
    assert report.confusion == stored["confusion_matrix"]
    assert report.metrics["accuracy"] == pytest.approx(stored["accuracy"])
    n = sum(map(sum, report.confusion))
    assert report.metrics["n"] == n == 4
    correct = sum(report.confusion[i][i] for i in range(len(report.classes)))
    assert len(report.misclassified) == n - correct
    assert all(0.0 <= wrong["score"] <= 1.0 and wrong["true"] != wrong["predicted"] for wrong in report.misclassified)
    roc = run_report.roc_frame(report)
    assert not roc.empty and roc["fpr"].between(0, 1).all() and roc["tpr"].max() == 1.0
    assert run_report.confusion_frame(report)["count"].sum() == n
    assert list(run_report.report_metric_table(report).columns) == ["metric", "value"]  # no intervals here
    assert run_report.report_metric_table(report).set_index("metric").loc["images", "value"] == "4"
    assert sum(row["count"] for row in report.reliability) == n
    assert calibration_error(report.reliability) == pytest.approx(report.metrics["ece"])
    assert not run_report.is_cross_validated(run_dir) and report.intervals == {} and report.protocol is None
    for chart in (charts.confusion_chart(report), charts.roc_chart(report), charts.misclassified_chart(report),
                  charts.reliability_chart(report)):
        assert chart.to_dict()

    # The second call reads report.json: no evaluation (it would fail here).
    import covidscan.evaluation

    monkeypatch.setattr(covidscan.evaluation, "evaluate_bundle", lambda *a, **k: pytest.fail("evaluated twice"))
    assert run_report.run_report(run_dir) == report


def test_an_older_cached_report_is_made_again_or_kept_when_that_fails(run_dir, tmp_path):
    from dataclasses import asdict

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    current = asdict(run_report.run_report(copy))
    older = {key: value for key, value in current.items() if key not in ("intervals", "reliability", "protocol", "version")}
    (copy / run_report.REPORT_FILE).write_text(json.dumps(older))
    remade = run_report.run_report(copy)  # the data is there: evaluated again, now with the reliability diagram
    assert remade.version == run_report.REPORT_VERSION and remade.reliability == current["reliability"]
    (copy / run_report.REPORT_FILE).write_text(json.dumps(older))
    config = json.loads((copy / "config.json").read_text())
    config["root"] = str(tmp_path / "moved-away")
    (copy / "config.json").write_text(json.dumps(config))
    kept = run_report.run_report(copy)  # the data is gone: the older report of this model still holds
    assert kept.version == 1 and kept.source == current["source"] and kept.roc == current["roc"] and not kept.reliability


def test_run_report_falls_back_to_the_card_when_the_data_is_gone(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / run_report.REPORT_FILE).unlink(missing_ok=True)
    config = json.loads((copy / "config.json").read_text())
    config["root"] = str(tmp_path / "moved-away")
    (copy / "config.json").write_text(json.dumps(config))
    report = run_report.run_report(copy)
    assert report.source == "the metrics training stored in the model card"
    assert "could not be read again" in report.note and report.roc == {} and report.confusion
    with pytest.raises(ModelBundleError, match="no saved model"):
        run_report.run_report(tmp_path)
