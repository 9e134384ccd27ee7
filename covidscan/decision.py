"""The decision rule from class probabilities to a label (torch-free: prediction needs no PyTorch)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def decide(probs: np.ndarray, classes: Sequence[str], positive_class: str | None = None,
           threshold: float | None = None) -> np.ndarray:
    """Predicted class indices: argmax, or 'positive when its probability >= threshold'.

    The one decision rule: :meth:`covidscan.predictor.Predictor.decide` calls it too, so metrics
    match what users see.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if threshold is None or positive_class is None:
        return probs.argmax(axis=1)
    positive = list(classes).index(positive_class)
    others = probs.copy()
    others[:, positive] = -np.inf
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))
