"""Evaluation: honest metrics of a model bundle on a dataset split.

:func:`compute_metrics` turns labels and class probabilities into accuracy, sensitivity,
specificity, precision, F1, ROC AUC (one-vs-rest for more than two classes), a per-class report,
the confusion matrix, ROC curve points and the expected calibration error (from the reliability
diagram's bins, :func:`reliability_bins`, which the run report draws too). :func:`evaluate_bundle`
runs a bundle over a dataset split the way the Predictor does (same preprocessing, the card's
temperature and threshold), optionally with flip test-time augmentation, and can draw PNG plots.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# Split loading lives in covidscan.datasets; re-exported here because training.py and pretrain.py import it from here.
from covidscan.datasets import align_classes, load_split_for, load_split_images  # noqa: F401
from covidscan.decision import decide  # noqa: F401 - the one decision rule, re-exported
from covidscan.errors import TrainingError

ECE_BINS = 15


def reliability_bins(y_true: Sequence[int], probs: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram's data: equal-width bins of the predicted class's probability.

    Args:
        y_true: true class index per image.
        probs: N x C probabilities.
        bins: number of equal-width bins over [0, 1].

    Returns:
        One dict per non-empty bin, in order: ``low`` and ``high`` (the bin's edges; it holds
        confidences in (low, high]), ``confidence`` (mean confidence), ``accuracy`` (share of its
        argmax decisions that are right) and ``count`` (images).
    """
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 falls in bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                         "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean()),
                         "count": int(members.sum())})
    return rows


def calibration_error(bins: Sequence[dict]) -> float:
    """ECE of :func:`reliability_bins` rows: the count-weighted gap between accuracy and confidence."""
    total = sum(row["count"] for row in bins)
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in bins)) if total else 0.0


def expected_calibration_error(y_true: Sequence[int], probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the sample-weighted gap between confidence and accuracy over equal-width confidence bins."""
    return calibration_error(reliability_bins(y_true, probs, bins))


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    positive_class: str | None = None,
    threshold: float | None = None,
    curves: bool = True,
) -> dict:
    """Classification metrics from true labels and class probabilities.

    Args:
        y_true: true class index per image.
        probs: N x C probabilities (rows sum to 1).
        classes: the C class names.
        positive_class: for two classes, the class whose sensitivity/specificity/F1/AUC are reported
            (default: the first class). Ignored for more classes.
        threshold: decision threshold on the positive class (default: argmax).
        curves: include the ROC curve points (``roc``); a bootstrap that needs only the scalar
            metrics leaves them out (``roc`` is then None).

    Returns:
        A JSON-ready dict: n, accuracy, sensitivity, specificity, precision, f1 (of the positive
        class for two classes, macro averages otherwise), macro_f1, auc, per_class, confusion_matrix
        (rows = true, columns = predicted), roc (curve points), ece.
    """
    from sklearn.metrics import auc as area_under_curve, precision_recall_fscore_support, roc_curve

    classes = list(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(classes)):
        raise TrainingError(f"Expected {len(y_true)} x {len(classes)} probabilities, got shape {probs.shape}.")
    if len(y_true) == 0:
        raise TrainingError("No images to evaluate.")
    if y_true.min() < 0 or y_true.max() >= len(classes):
        raise TrainingError(f"True class indices must lie in 0..{len(classes) - 1}, for the classes {classes}.")
    labels = list(range(len(classes)))
    binary = len(classes) == 2
    positive_class = positive_class or (classes[0] if binary else None)
    y_pred = decide(probs, classes, positive_class if binary else None, threshold if binary else None)
    # Counted directly: sklearn's confusion_matrix re-validates its inputs, a third of this function's
    # time in a thousand-resample bootstrap.
    matrix = np.bincount(y_true * len(classes) + y_pred, minlength=len(classes) ** 2).reshape(len(classes), -1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    total = matrix.sum()
    per_class: dict[str, dict] = {}
    rocs: dict[str, dict] = {}
    for k, name in enumerate(classes):
        true_negative = total - matrix[k, :].sum() - matrix[:, k].sum() + matrix[k, k]
        negatives = total - matrix[k, :].sum()
        is_k = (y_true == k).astype(int)
        auc_k = None
        if 0 < is_k.sum() < len(is_k):
            # roc_auc_score is exactly auc() of this curve; computing the curve once halves the cost
            # (the bootstrap calls this function a thousand times per estimate).
            fpr, tpr, thresholds = roc_curve(is_k, probs[:, k])
            auc_k = float(area_under_curve(fpr, tpr))
            if curves:
                rocs[name] = {"fpr": _floats(fpr), "tpr": _floats(tpr), "thresholds": _floats(thresholds)}
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),  # = sensitivity
            "specificity": float(true_negative / negatives) if negatives else None,
            "f1": float(f1[k]),
            "support": int(support[k]),
            "auc": auc_k,
        }
    result: dict = {
        "n": int(len(y_true)),
        "classes": classes,
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(np.mean(f1)),
    }
    if binary:
        positive = per_class[positive_class]
        result.update(positive_class=positive_class, threshold=threshold, sensitivity=positive["recall"],
                      specificity=positive["specificity"], precision=positive["precision"], f1=positive["f1"],
                      auc=positive["auc"])
        result["roc"] = rocs.get(positive_class)  # None without curves: rocs is then empty
    else:
        present = sorted(set(y_true.tolist()))
        auc = None
        if len(present) == len(classes):  # one-vs-rest macro AUC, as roc_auc_score(multi_class="ovr") gives it
            auc = float(np.mean([per_class[name]["auc"] for name in classes]))
        result.update(sensitivity=float(np.mean(recall)),
                      specificity=_mean([p["specificity"] for p in per_class.values()]),
                      precision=float(np.mean(precision)), f1=float(np.mean(f1)), auc=auc)
        result["roc"] = rocs if curves else None
    result["per_class"] = per_class
    result["confusion_matrix"] = matrix.tolist()
    result["ece"] = expected_calibration_error(y_true, probs)
    return result


def _floats(values: np.ndarray) -> list[float | None]:
    """JSON-safe floats (sklearn's first ROC threshold is +inf)."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


# --------------------------------------------------------------------------- running a model
@torch.no_grad()
def predict_logits(model: torch.nn.Module, images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                   device: torch.device | str = "cpu", batch_size: int = 64, tta: bool = False) -> torch.Tensor:
    """Logits of N x 3 x S x S uint8 images (already at the model's input size).

    With ``tta`` the logits of each image and its left-right mirror are averaged.
    """
    from covidscan.transforms import model_input

    device = torch.device(device)
    model.eval()
    outputs = []
    for start in range(0, len(images_uint8), batch_size):
        batch = model_input(images_uint8[start:start + batch_size], mean, std, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch).float()
            if tta:
                logits = (logits + model(torch.flip(batch, dims=[3])).float()) / 2
        outputs.append(logits.cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def fit_temperature(logits: torch.Tensor, labels: Sequence[int]) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017)."""
    logits = logits.detach().float()
    target = torch.as_tensor(list(labels), dtype=torch.long)
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    temperature = float(log_t.exp().item())
    return float(min(max(temperature, 0.05), 20.0)) if math.isfinite(temperature) else 1.0


def evaluate_bundle(
    model: str | os.PathLike,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    tta: bool = False,
    device: str = "cpu",
    batch_size: int = 64,
    plots_dir: str | os.PathLike | None = None,
    dataset_options: dict | None = None,
) -> dict:
    """Evaluate a model bundle on one split of a dataset.

    Args:
        model: the bundle's path.
        dataset, root, split: which images (see :func:`covidscan.datasets.open_dataset`).
        tta: average the predictions of each image and its mirror image.
        device: ``cpu``, ``cuda`` or ``auto``.
        plots_dir: when given, write roc.png, confusion.png, calibration.png, misclassified.png there.

    Returns:
        :func:`compute_metrics`'s dict plus model, dataset, split, tta, temperature, ``reliability``
        (:func:`reliability_bins`) and ``misclassified`` (file name, true and predicted class, probabilities).
    """
    from covidscan.bundle import load_bundle

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_bundle(model, device=device)
    card = bundle.card
    data, y_true, images = load_split_for(card, dataset, root, split, dataset_options)
    logits = predict_logits(bundle.model, images, card.mean, card.std, device, batch_size, tta)
    probs = torch.softmax(logits / float(card.temperature), dim=1).numpy()
    metrics = compute_metrics(y_true, probs, card.classes, card.positive_class, card.threshold)
    predicted = decide(probs, card.classes, card.positive_class, card.threshold)
    misclassified = [
        {"file": item.path.name, "true": card.classes[t], "predicted": card.classes[p],
         "probabilities": {c: float(v) for c, v in zip(card.classes, row)}}
        for item, t, p, row in zip(data.items, y_true, predicted, probs) if t != p
    ]
    report = {"model": card.name, "bundle": str(model), "dataset": dataset, "split": split, "tta": tta,
              "temperature": card.temperature, **metrics, "reliability": reliability_bins(y_true, probs),
              "misclassified": misclassified}
    if plots_dir is not None:
        report["plots"] = write_plots(report, probs, y_true, plots_dir)
    return report


def write_plots(report: dict, probs: np.ndarray, y_true: np.ndarray, folder: str | os.PathLike) -> list[str]:
    """ROC curve(s), confusion matrix, reliability diagram and misclassified-score histogram as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    written = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    curves = {report["positive_class"]: report["roc"]} if len(classes) == 2 else report["roc"]
    for name, roc in (curves or {}).items():
        if roc:
            auc = report["per_class"][name]["auc"]
            ax.plot(roc["fpr"], roc["tpr"], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right")
    written.append(_save(fig, folder / "roc.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    matrix = np.array(report["confusion_matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix")
    written.append(_save(fig, folder / "confusion.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = reliability_bins(y_true, probs)
    centers, accuracy = [row["confidence"] for row in bins], [row["accuracy"] for row in bins]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(centers, accuracy, "o-")
    ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {report['ece']:.3f})")
    written.append(_save(fig, folder / "calibration.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    wrong = [max(m["probabilities"].values()) for m in report["misclassified"]]
    ax.hist(wrong, bins=np.linspace(0, 1, 21), color="tab:red")
    ax.set(xlabel="probability of the (wrong) predicted class", ylabel="images",
           title=f"Misclassified images ({len(wrong)})")
    written.append(_save(fig, folder / "misclassified.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
