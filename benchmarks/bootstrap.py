"""How much faster the estimate's group bootstrap is than one built on sklearn's metric functions.

Both compute, for each of the same group resamples, every figure an interval is drawn for (AUC,
accuracy, macro F1, sensitivity, specificity, precision, F1 and per-class recall): ours with
:func:`covidscan.estimate.bootstrap_intervals`, the reference by calling sklearn's
``roc_auc_score``, ``confusion_matrix`` and ``precision_recall_fscore_support`` afresh per resample.
Prints the milliseconds per resample of each, their ratio measured in this one run, and the largest
difference between their intervals (0: the same figures). Synthetic predictions of the shipped
estimates' sizes (CT: 543 slices in 231 groups, two classes; X-ray: 243 images in 238 groups, three
classes).

    python benchmarks/bootstrap.py [--samples 300]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from covidscan.estimate import bootstrap_intervals, group_resamples


def reference_intervals(y_true: np.ndarray, probs: np.ndarray, groups: list[str], samples: int) -> dict:
    """The same percentile intervals from sklearn's own functions (positive class: index 0)."""
    binary = probs.shape[1] == 2
    draws: dict[str, list[float]] = {}
    for index in group_resamples(groups, samples, 0):
        y, p = y_true[index], probs[index]
        pred = p.argmax(axis=1)
        labels = list(range(probs.shape[1]))
        precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
        matrix = confusion_matrix(y, pred, labels=labels)
        specificity = [(matrix.sum() - matrix[k].sum() - matrix[:, k].sum() + matrix[k, k]) / (matrix.sum() - matrix[k].sum())
                       for k in labels]
        figures = {"accuracy": float((pred == y).mean()), "macro_f1": float(np.mean(f1))}
        if binary:
            figures.update(auc=roc_auc_score(y == 0, p[:, 0]), sensitivity=recall[0], specificity=specificity[0],
                           precision=precision[0], f1=f1[0])
        else:
            figures.update(auc=roc_auc_score(y, p, multi_class="ovr"), sensitivity=np.mean(recall),
                           specificity=np.mean(specificity), precision=np.mean(precision), f1=np.mean(f1))
        for name, value in figures.items():
            draws.setdefault(name, []).append(float(value))
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in draws.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="bootstrap resamples per timing")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for name, n, n_groups, classes in (("CT", 543, 231, ["COVID", "NonCOVID"]),
                                       ("X-ray", 243, 238, ["Covid", "Normal", "Viral Pneumonia"])):
        y_true = rng.integers(0, len(classes), n)
        # Scores that lean towards the truth, as a model's do.
        logits = rng.normal(size=(n, len(classes))) + 2.0 * np.eye(len(classes))[y_true]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        groups = [f"g{i % n_groups}" for i in range(n)]
        start = time.perf_counter()
        ours = bootstrap_intervals(y_true, probs, groups, classes, classes[0], samples=args.samples)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = reference_intervals(y_true, probs, groups, args.samples)
        reference_s = time.perf_counter() - start
        gap = max(abs(a - b) for metric in reference for a, b in zip(ours[metric], reference[metric]))
        print(f"{name}: {1000 * ours_s / args.samples:.1f} ms per resample, sklearn's functions "
              f"{1000 * reference_s / args.samples:.1f} ms: {reference_s / ours_s:.1f}x faster; "
              f"largest interval difference {gap:.1e}")


if __name__ == "__main__":
    main()
