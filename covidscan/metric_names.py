"""The words a reader sees for metric keys and split names, in the app, the PDF and the run report.

One mapping, so "val_auc" reads "validation AUC" wherever it is shown. The keys stay as they are in
files (``metrics.csv``, ``progress.json``, model cards); only what a person reads is translated.
"""
from __future__ import annotations

import re

#: Display name of every metric key covidscan writes (per-epoch curves and evaluation metrics).
METRIC_NAMES: dict[str, str] = {
    "accuracy": "accuracy",
    "auc": "ROC AUC",
    "f1": "F1",
    "macro_f1": "macro F1",
    "sensitivity": "sensitivity (recall)",
    "specificity": "specificity",
    "precision": "precision",
    "recall": "recall",
    "loss": "loss",
    "ece": "calibration error (ECE)",
    "n": "images",
    "train_loss": "training loss",
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
    "val_auc": "validation AUC",
    "val_f1": "validation F1",
    "lr": "learning rate",
}

#: Display name of the split names datasets use.
SPLIT_NAMES: dict[str, str] = {"train": "training", "val": "validation", "test": "test",
                               # a card's cross-validated (out-of-fold) figures, see covidscan.cv / covidscan.repeats
                               "estimate": "cross-validated estimate", "repeated_estimate": "cross-validated estimate"}

# Longest keys first, so "val_auc" is replaced before a shorter key could match inside it.
_KEYS_IN_TEXT = re.compile(r"\b(" + "|".join(sorted((k for k in METRIC_NAMES if "_" in k), key=len,
                                                     reverse=True)) + r")\b")


def metric_name(key: str) -> str:
    """The display name of a metric key (the key itself when it is not a known one).

    Args:
        key: e.g. ``"val_auc"`` or ``"sensitivity"``.

    Returns:
        e.g. ``"validation AUC"``; an unknown key reads with its underscores as spaces.
    """
    return METRIC_NAMES.get(key, key.replace("_", " "))


def split_name(split: str) -> str:
    """The display name of a split (``"val"`` reads ``"validation"``; unknown names are kept)."""
    return SPLIT_NAMES.get(split, split)


def readable_metric_keys(text: str) -> str:
    """Replace the metric keys inside a message (``"best val_auc 0.96"`` -> ``"best validation AUC 0.96"``)."""
    return _KEYS_IN_TEXT.sub(lambda match: METRIC_NAMES[match.group(1)], text)
