"""The run report of a cross-validation run: a real 3-fold tiny_cnn ``cross_validate`` whose report
comes from its out-of-fold predictions (the card's estimate, its intervals, curves from oof.csv),
never from evaluating the ensemble on images its members trained on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import auc as area_under
from synthetic import tiny_train_config, two_class_folder

from app_pages import charts
from covidscan import run_report
from covidscan.bundle import read_card
from covidscan.cv import CVOptions, cross_validate
from covidscan.oof import OOF_FILE, cross_fitted_probabilities, per_image, read_oof_csv
from covidscan.evaluation import calibration_error, expected_calibration_error, reliability_bins


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> Path:
    """A finished 3-fold cross-validation of tiny_cnn on two learnable synthetic classes (28 pooled images)."""
    base = tmp_path_factory.mktemp("cv_report")
    root = base / "data"
    two_class_folder(root, {"train": 10, "val": 4}, size=48)
    config = tiny_train_config(root)
    out = base / "runs" / "20260102-100000-c0ffee"
    result = cross_validate(config, CVOptions(folds=3, bootstrap=100), out)
    assert result.state == "succeeded"
    # A cross-validation job's run directory also holds the launch config: its val split is
    # training data of every fold model, which the report must not evaluate on.
    (out / "config.json").write_text(json.dumps({"dataset": "folder", "root": str(root), "val_split": "val"}))
    return out


def oof_probabilities(run_dir: Path):
    """The per-image cross-fitted OOF probabilities, computed here from the stored oof.csv."""
    rows, _ = read_oof_csv(run_dir / "model" / OOF_FILE)
    _, labels, probs, _ = per_image(rows, cross_fitted_probabilities(rows))
    return labels, probs


def test_cv_report_comes_from_the_out_of_fold_estimate(cv_run, monkeypatch):
    import covidscan.evaluation

    monkeypatch.setattr(covidscan.evaluation, "evaluate_bundle",
                        lambda *a, **k: pytest.fail("a cross-validated ensemble was evaluated on its val split"))
    (cv_run / run_report.REPORT_FILE).unlink(missing_ok=True)
    assert run_report.is_cross_validated(cv_run)
    report = run_report.run_report(cv_run)
    card = read_card(cv_run / "model")
    est = card.metrics["estimate"]
    assert report.split == run_report.OUT_OF_FOLD and report.note is None
    assert report.source == f"out-of-fold predictions of 3-fold cross-validation (28 images, {est['groups']} groups)"
    assert report.protocol == est["protocol"] and "3-fold" in report.protocol
    assert report.metrics == {key: est.get(key) for key in run_report.REPORT_METRICS}
    assert report.metrics["n"] == est["n"] == 28

    # Every interval is the estimate's, and brackets its value.
    assert report.intervals == {key: est["ci95"][key] for key in run_report.REPORT_METRICS if key in est["ci95"]}
    for key in ("auc", "accuracy", "macro_f1", "sensitivity", "specificity", "ece"):
        low, high = report.intervals[key]
        assert 0 <= low <= report.metrics[key] <= high <= 1, key
    table = run_report.report_metric_table(report).set_index("metric")
    assert list(table.columns) == ["value", run_report.CI_COLUMN]
    low, high = (float(v) for v in table.loc["accuracy", run_report.CI_COLUMN].split(" – "))
    assert low == pytest.approx(report.intervals["accuracy"][0], abs=5e-4)
    assert high == pytest.approx(report.intervals["accuracy"][1], abs=5e-4)
    assert table.loc["images", "value"] == "28" and table.loc["images", run_report.CI_COLUMN] == ""

    # Confusion matrix, ROC and misclassified images from the OOF probabilities, agreeing with the estimate.
    assert report.confusion == est["confusion_matrix"] and sum(map(sum, report.confusion)) == 28
    labels, probs = oof_probabilities(cv_run)
    predicted = probs.argmax(axis=1)
    assert len(report.misclassified) == int((predicted != labels).sum())
    assert all(wrong["true"] != wrong["predicted"] and 0.5 <= wrong["score"] <= 1 for wrong in report.misclassified)
    [curve] = report.roc.values()
    assert area_under(curve["fpr"], curve["tpr"]) == pytest.approx(est["auc"])

    # Reliability diagram: the evaluation module's bins of the same probabilities; its ECE is the estimate's.
    assert report.reliability == reliability_bins(labels, probs)
    assert sum(row["count"] for row in report.reliability) == 28
    for row in report.reliability:
        assert row["low"] < row["confidence"] <= row["high"] and 0 <= row["accuracy"] <= 1
    assert calibration_error(report.reliability) == pytest.approx(expected_calibration_error(labels, probs))
    assert report.metrics["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    frame = run_report.reliability_frame(report)
    assert frame["images"].sum() == 28 and list(frame.columns) == ["confidence bin", "mean confidence", "accuracy",
                                                                   "images"]
    spec = json.dumps(charts.reliability_chart(report).to_dict())
    assert f"Reliability diagram (ECE {report.metrics['ece']:.3f})" in spec
    assert "Confusion matrix (out-of-fold)" in json.dumps(charts.confusion_chart(report).to_dict())

    # Cached, keyed on the weights: the second call reads report.json.
    cached = json.loads((cv_run / run_report.REPORT_FILE).read_text())
    assert cached["version"] == run_report.REPORT_VERSION and cached["weights_sha256"] == card.weights_sha256
    monkeypatch.setattr("covidscan.oof.cross_fitted_probabilities", lambda rows: pytest.fail("recomputed"))
    assert run_report.run_report(cv_run) == report


def test_an_older_cached_report_of_a_cv_run_is_made_again(cv_run):
    """A report.json written before this version (here: a val-split evaluation) is replaced by the OOF report."""
    card = read_card(cv_run / "model")
    old = {"source": "the best model evaluated on the validation split", "split": "val", "classes": card.classes,
           "metrics": {"accuracy": 1.0, "n": 28}, "confusion": [[14, 0], [0, 14]], "roc": {}, "misclassified": [],
           "weights_sha256": card.weights_sha256, "note": None}
    (cv_run / run_report.REPORT_FILE).write_text(json.dumps(old))
    report = run_report.run_report(cv_run, evaluate=False)
    assert report.split == run_report.OUT_OF_FOLD and report.reliability and report.intervals
    assert report.metrics["accuracy"] == card.metrics["estimate"]["accuracy"]


def test_cv_report_without_usable_oof_predictions_keeps_the_card_estimate(cv_run, tmp_path):
    est = read_card(cv_run / "model").metrics["estimate"]
    changed = tmp_path / "changed"
    shutil.copytree(cv_run / "model", changed / "model")
    oof = changed / "model" / OOF_FILE
    lines = oof.read_text().splitlines(keepends=True)
    oof.chmod(0o644)
    oof.write_text("".join(lines[:-1]))  # one prediction fewer than the estimate was made from
    report = run_report.run_report(changed)
    assert "is not the one its estimate was made from" in report.note
    assert report.metrics["accuracy"] == est["accuracy"] and report.intervals["auc"] == est["ci95"]["auc"]
    assert report.confusion == est["confusion_matrix"] and not report.roc and not report.reliability

    gone = tmp_path / "gone"
    shutil.copytree(cv_run / "model", gone / "model")
    (gone / "model" / OOF_FILE).unlink()
    report = run_report.run_report(gone)
    assert "could not be read" in report.note and report.metrics["n"] == 28 and not report.reliability


def test_reliability_bins_by_hand():
    # Confidences 0.8 (right), 0.7 (right), 0.6 (wrong), 0.7 (right), as in test_evaluation's ECE example.
    probs = np.array([[0.8, 0.1, 0.1], [0.15, 0.7, 0.15], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    bins = reliability_bins([0, 1, 0, 0], probs)
    assert [row["count"] for row in bins] == [1, 2, 1]
    assert [row["accuracy"] for row in bins] == [0.0, 1.0, 1.0]
    assert [row["confidence"] for row in bins] == pytest.approx([0.6, 0.7, 0.8])
    # A bin holds (low, high]: 0.6 is the upper edge of the ninth of 15 bins.
    assert bins[0]["low"] == pytest.approx(8 / 15) and bins[0]["high"] == pytest.approx(9 / 15)
    assert calibration_error(bins) == pytest.approx((1 / 4) * 0.6 + (2 / 4) * 0.3 + (1 / 4) * 0.2)
