"""Estimates: group-bootstrap intervals match the known binomial answer and widen for correlated groups."""
from __future__ import annotations

import numpy as np
import pytest

from covidscan.estimate import bootstrap_intervals, estimate


def _predictions(n: int, accuracy: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    correct = np.zeros(n, dtype=bool)
    correct[rng.permutation(n)[: round(accuracy * n)]] = True
    predicted = np.where(correct, y, 1 - y)
    score = np.where(predicted == 0, 0.8, 0.2) + rng.normal(0, 0.01, n)
    probs = np.stack([score, 1 - score], axis=1)
    return y, probs


def test_accuracy_interval_matches_the_binomial_interval():
    y, probs = _predictions(400, 0.8)
    ci = bootstrap_intervals(y, probs, [str(i) for i in range(400)], ["COVID", "NonCOVID"], samples=1000)
    low, high = ci["accuracy"]
    half = 1.96 * np.sqrt(0.8 * 0.2 / 400)  # 0.039
    assert low < 0.8 < high
    assert low == pytest.approx(0.8 - half, abs=0.012) and high == pytest.approx(0.8 + half, abs=0.012)


def test_images_of_one_patient_widen_the_interval_by_about_the_square_root_of_their_count():
    y, probs = _predictions(100, 0.8, seed=1)
    # Four slices per patient, each a copy of the patient's one independent outcome.
    y4, probs4 = np.repeat(y, 4), np.repeat(probs, 4, axis=0)
    as_images = bootstrap_intervals(y4, probs4, [str(i) for i in range(400)], ["A", "B"], samples=600)
    as_patients = bootstrap_intervals(y4, probs4, [str(i // 4) for i in range(400)], ["A", "B"], samples=600)
    width_images = np.diff(as_images["accuracy"])[0]
    width_patients = np.diff(as_patients["accuracy"])[0]
    assert width_patients / width_images == pytest.approx(2.0, rel=0.25)


def test_estimate_carries_every_metric_its_interval_and_the_protocol():
    y, probs = _predictions(120, 0.75, seed=2)
    result = estimate(y, probs, [str(i // 2) for i in range(120)], ["COVID", "NonCOVID"], "5-fold CV", samples=200)
    assert result["n"] == 120 and result["groups"] == 60 and result["protocol"] == "5-fold CV"
    assert result["accuracy"] == pytest.approx(0.75)
    for name in ("auc", "accuracy", "macro_f1", "sensitivity", "specificity", "recall[COVID]"):
        low, high = result["ci95"][name]
        assert low <= (result.get(name) if "[" not in name else result["per_class"]["COVID"]["recall"]) <= high
    assert "roc" not in result and result["bootstrap"]["samples"] == 200
