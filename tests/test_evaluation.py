"""Evaluation: metrics against hand-computed values, calibration, and the evaluate CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.evaluation import (compute_metrics, decide, evaluate_bundle, expected_calibration_error,
                                  fit_temperature)
from covidscan.errors import DatasetError, TrainingError
from synthetic import tiny_bundle
from test_datasets import make_folder

REPO = Path(__file__).resolve().parents[1]


def test_binary_metrics_match_hand_computation():
    # Positive class COVID (index 0). Scores of COVID for 6 images, 3 COVID then 3 NonCOVID.
    covid = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1])
    probs = np.stack([covid, 1 - covid], axis=1)
    y_true = [0, 0, 0, 1, 1, 1]
    m = compute_metrics(y_true, probs, ["COVID", "NonCOVID"], positive_class="COVID")
    # Predictions (argmax): COVID, COVID, Non, COVID, Non, Non -> TP 2, FN 1, FP 1, TN 2.
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # AUC = fraction of (positive, negative) pairs ranked correctly: 0.9>all 3, 0.6>0.2,0.1, 0.3>0.2,0.1 -> 7/9.
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["roc"]["fpr"][-1] == 1.0 and m["roc"]["tpr"][-1] == 1.0
    assert m["per_class"]["NonCOVID"]["recall"] == pytest.approx(2 / 3)
    json.dumps(m)  # JSON-ready (no inf, no numpy types)


def test_threshold_changes_decisions_like_the_predictor():
    probs = np.array([[0.3, 0.7], [0.45, 0.55], [0.8, 0.2]])
    assert decide(probs, ["COVID", "NonCOVID"]).tolist() == [1, 1, 0]
    assert decide(probs, ["COVID", "NonCOVID"], "COVID", 0.4).tolist() == [1, 0, 0]
    m = compute_metrics([0, 0, 1], probs, ["COVID", "NonCOVID"], "COVID", threshold=0.4)
    assert m["confusion_matrix"] == [[1, 1], [1, 0]] and m["threshold"] == 0.4


def test_three_class_metrics_and_ece():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    y_true = [0, 1, 2, 2]
    m = compute_metrics(y_true, probs, ["Covid", "Normal", "Viral Pneumonia"])
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(0.75)
    # Per class F1: Covid 1, Normal 2*(0.5*1)/(1.5) = 2/3, Viral 2*(1*0.5)/1.5 = 2/3.
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["per_class"]["Viral Pneumonia"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["Normal"]["specificity"] == pytest.approx(2 / 3)
    assert set(m["roc"]) == {"Covid", "Normal", "Viral Pneumonia"} and 0 <= m["auc"] <= 1
    # ECE by hand (15 bins): confidences 0.8 (right), 0.7 (right), 0.6 (wrong), 0.7 (right).
    # Bins: 0.6 -> (0.6-0.667] alone: |0 - 0.6|; 0.7, 0.7 -> (0.667, 0.733]: |1 - 0.7|; 0.8 -> |1 - 0.8|.
    expected = (1 / 4) * 0.6 + (2 / 4) * 0.3 + (1 / 4) * 0.2
    assert m["ece"] == pytest.approx(expected)
    assert expected_calibration_error(y_true, probs) == pytest.approx(expected)


def test_auc_is_none_when_a_class_is_absent():
    probs = np.array([[0.8, 0.2], [0.6, 0.4]])
    assert compute_metrics([0, 0], probs, ["COVID", "NonCOVID"])["auc"] is None


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_metrics_equal_sklearns_own_functions_exactly(n_classes):
    # compute_metrics takes each AUC from the ROC curve it already draws and counts the confusion
    # matrix itself (the bootstrap calls it a thousand times); the figures must stay sklearn's to the
    # last bit, or a card's stored estimate would no longer reproduce.
    from sklearn.metrics import confusion_matrix, roc_auc_score

    rng = np.random.default_rng(n_classes)
    classes = [f"class{k}" for k in range(n_classes)]
    for _ in range(40):
        y_true = rng.integers(0, n_classes, int(rng.integers(n_classes * 2, 200)))
        probs = rng.dirichlet(np.ones(n_classes), len(y_true))
        probs = np.round(probs, int(rng.integers(1, 4)))  # coarse scores: many ties
        probs = probs / probs.sum(axis=1, keepdims=True)
        if len(set(y_true.tolist())) < n_classes:
            continue
        m = compute_metrics(y_true, probs, classes)
        assert m["confusion_matrix"] == confusion_matrix(y_true, probs.argmax(axis=1)).tolist()
        for k, name in enumerate(classes):
            assert m["per_class"][name]["auc"] == roc_auc_score(y_true == k, probs[:, k])
        if n_classes == 2:
            assert m["auc"] == roc_auc_score(y_true == 0, probs[:, 0])
        else:
            assert m["auc"] == roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
        # Without the curves (the bootstrap's call): the same figures, no curve points.
        light = compute_metrics(y_true, probs, classes, curves=False)
        assert light["roc"] is None and {**light, "roc": m["roc"]} == m


def test_true_labels_outside_the_classes_are_refused():
    probs = np.full((3, 2), 0.5)
    with pytest.raises(TrainingError, match="0..1"):
        compute_metrics([0, 1, 2], probs, ["COVID", "NonCOVID"])


def test_temperature_scaling_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    # Logits point at the right class 70% of the time but with huge confidence: T must be > 1.
    right = rng.random(400) < 0.7
    sign = np.where(right, 1, -1) * np.where(labels == 0, 1, -1)
    logits = torch.tensor(np.stack([sign * 8.0, -sign * 8.0], axis=1), dtype=torch.float32)
    temperature = fit_temperature(logits, labels.tolist())
    assert temperature > 3
    before = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels))
    after = torch.nn.functional.cross_entropy(logits / temperature, torch.as_tensor(labels))
    assert after < before


def test_evaluate_bundle_and_cli(tmp_path):
    root = make_folder(tmp_path / "data", classes=("COVID", "NonCOVID"), per_class=10, size=40)
    bundle = tiny_bundle(tmp_path / "bundle", classes=("COVID", "NonCOVID"), modality="X-ray",
                         positive_class="COVID")
    report = evaluate_bundle(bundle, "folder", root, "val", tta=True, plots_dir=tmp_path / "plots")
    assert report["n"] == 4 and report["split"] == "val" and report["tta"] is True
    assert sum(map(sum, report["confusion_matrix"])) == 4
    assert len(report["misclassified"]) == round(4 * (1 - report["accuracy"]))
    assert sorted(Path(p).name for p in report["plots"]) == ["calibration.png", "confusion.png", "misclassified.png", "roc.png"]
    done = subprocess.run([sys.executable, "-m", "covidscan", "evaluate", "--model", str(bundle), "--dataset", "folder",
                           "--root", str(root), "--split", "val", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["confusion_matrix"] == report["confusion_matrix"] or report["tta"]
    bad = subprocess.run([sys.executable, "-m", "covidscan", "evaluate", "--model", str(bundle), "--dataset", "folder",
                          "--root", str(root), "--split", "test"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no 'test' split" in bad.stderr


def test_class_names_must_match_the_model(tmp_path):
    root = make_folder(tmp_path / "data", classes=("Cat", "Dog"), per_class=4, size=40)
    bundle = tiny_bundle(tmp_path / "bundle", classes=("COVID", "NonCOVID"))
    with pytest.raises(DatasetError, match="do not match"):
        evaluate_bundle(bundle, "folder", root, "val")
