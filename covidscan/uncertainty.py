"""Uncertainty of a prediction and the selective-prediction summary (numpy only).

:func:`prediction_uncertainty` is one number per prediction in [0, 1], higher = less sure: for an
ensemble the entropy of the members' mean probabilities / log C (= the members' mean entropy +
their Jensen-Shannon disagreement), for a single model the normalised entropy.
:func:`selective_summary` is accuracy against coverage when only the most certain are answered.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Coverage at which "uncertain" starts: the 20% most uncertain held-in predictions are called uncertain.
UNCERTAIN_COVERAGE = 0.8
SELECTIVE_COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def prediction_uncertainty(probabilities: np.ndarray, member_probabilities: np.ndarray | None = None) -> np.ndarray:
    """One uncertainty per image in [0, 1], higher = less sure.

    Args:
        probabilities: N x C, the probabilities the user sees (used for a single model).
        member_probabilities: M x N x C, each ensemble member's probabilities (None or M = 1 for a
            single model).

    Returns:
        N values: the entropy of the members' mean probabilities / log C, which is the members'
        mean entropy plus their disagreement (Jensen-Shannon divergence); for a single model the
        normalised entropy of ``probabilities``.
    """
    norm = np.log(np.asarray(probabilities).shape[-1])
    if member_probabilities is not None and len(member_probabilities) > 1:
        return _entropy(np.asarray(member_probabilities, dtype=np.float64).mean(axis=0)) / norm
    return _entropy(np.asarray(probabilities, dtype=np.float64)) / norm


def member_disagreement(member_probabilities: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence of the members' probabilities / log C (the ensemble part of the uncertainty)."""
    members = np.asarray(member_probabilities, dtype=np.float64)
    return np.maximum(_entropy(members.mean(axis=0)) - _entropy(members).mean(axis=0), 0.0) / np.log(members.shape[-1])


def selective_summary(uncertainty: np.ndarray, correct: np.ndarray,
                      coverages: Sequence[float] = SELECTIVE_COVERAGES) -> dict:
    """Accuracy against coverage when only the most certain images are answered.

    Returns:
        ``{"coverage": [...], "accuracy": [...], "n": N, "uncertain_above": u}`` where u is the
        uncertainty above which the ``1 - UNCERTAIN_COVERAGE`` most uncertain images lie.
    """
    uncertainty, correct = np.asarray(uncertainty, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(uncertainty, kind="stable")
    accuracy = []
    for coverage in coverages:
        kept = order[:max(1, int(round(coverage * len(order))))]
        accuracy.append(float(correct[kept].mean()))
    cutoff = float(np.quantile(uncertainty, UNCERTAIN_COVERAGE, method="higher"))
    return {"coverage": list(coverages), "accuracy": accuracy, "n": int(len(order)), "uncertain_above": cutoff}


def selective_sentence(summary: dict, coverage: float = UNCERTAIN_COVERAGE, images: str = "validation images") -> str:
    """E.g. 'answering the 80% most certain images, accuracy rises from 0.86 to 0.91 (118 validation images)'."""
    coverages = list(summary.get("coverage", []))
    if 1.0 not in coverages or coverage not in coverages:
        return ""
    overall, selected = summary["accuracy"][coverages.index(1.0)], summary["accuracy"][coverages.index(coverage)]
    verb = "rises" if selected > overall else ("stays" if selected == overall else "falls")
    return (f"answering the {coverage:.0%} most certain images, accuracy {verb} from {overall:.3f} to {selected:.3f} "
            f"({summary.get('n', '?')} {images})")


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def member_probabilities(member_logits: Sequence[np.ndarray], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The shown probabilities (softmax of the members' mean logits / T) and each member's (at T)."""
    stacked = np.stack([np.asarray(l, dtype=np.float64) for l in member_logits])
    return _softmax(stacked.mean(axis=0), temperature), _softmax(stacked, temperature)
