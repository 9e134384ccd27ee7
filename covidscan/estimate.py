"""Honest performance estimates: metrics of out-of-fold predictions with group-bootstrap intervals.

The intervals resample whole groups (patients, sources, near-duplicate sets) with replacement, so
slices of one patient, which are not independent evidence, widen the interval as they should.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from covidscan.evaluation import compute_metrics

#: Scalar metrics of :func:`covidscan.evaluation.compute_metrics` that get an interval.
INTERVAL_METRICS = ("auc", "accuracy", "macro_f1", "sensitivity", "specificity", "precision", "f1", "ece")
# The figures a summary leads with (the cv commands print them; cv-compare compares them).
HEADLINE_METRICS = INTERVAL_METRICS[:5]
DEFAULT_BOOTSTRAP = 1000


def check_bootstrap_samples(samples: int) -> None:
    """Raise TrainingError for too few resamples to bound a 95% interval."""
    from covidscan.errors import TrainingError

    if samples < 100:
        raise TrainingError("Use at least 100 bootstrap samples.")


def _scalars(metrics: dict) -> dict[str, float | None]:
    values = {name: metrics.get(name) for name in INTERVAL_METRICS}
    for name, per_class in metrics.get("per_class", {}).items():
        values[f"recall[{name}]"] = per_class.get("recall")
    return values


def _light_validation():
    """sklearn without its per-call argument checks: the bootstrap's inputs are checked once, before it."""
    import sklearn

    return sklearn.config_context(assume_finite=True, skip_parameter_validation=True)


def group_resamples(groups: Sequence[str], samples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Indices of ``samples`` bootstrap resamples that draw whole groups with replacement."""
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])


def bootstrap_intervals(
    y_true: Sequence[int],
    probs: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    positive_class: str | None = None,
    threshold: float | None = None,
    samples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every scalar metric, resampling whole groups.

    Args:
        y_true: true class index per image.
        probs: N x C probabilities.
        groups: group name per image (one name per image for plain image resampling).
        classes, positive_class, threshold: as for :func:`covidscan.evaluation.compute_metrics`.
        samples: bootstrap resamples.
        seed: the resampling seed.
        level: coverage of the interval.

    Returns:
        ``{metric: [low, high]}`` for each metric defined in enough resamples (AUC needs both classes).
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    draws: dict[str, list[float]] = {}
    compute_metrics(y_true, probs, classes, positive_class, threshold, curves=False)  # bad input fails here
    with _light_validation():
        for index in group_resamples(groups, samples, seed):
            metrics = compute_metrics(y_true[index], probs[index], classes, positive_class, threshold, curves=False)
            for name, value in _scalars(metrics).items():
                if value is not None:
                    draws.setdefault(name, []).append(float(value))
    tail = (1 - level) / 2 * 100
    # A metric undefined in most resamples (a class missing) has no trustworthy interval.
    return {name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            for name, values in draws.items() if len(values) >= 0.9 * samples}


def estimate(
    y_true: Sequence[int],
    probs: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    protocol: str,
    positive_class: str | None = None,
    threshold: float | None = None,
    samples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """The card's ``metrics.estimate``: every metric of the predictions plus their 95% intervals.

    Args:
        y_true, probs, groups, classes, positive_class, threshold: see :func:`bootstrap_intervals`.
        protocol: how the predictions were obtained, in words (recorded with the figures).
        samples, seed: bootstrap settings.

    Returns:
        ``{"n", "groups", "protocol", "auc", "accuracy", "macro_f1", "sensitivity", "specificity", ...,
        "per_class", "confusion_matrix", "ci95": {metric: [lo, hi]}, "bootstrap": {...}}``.
    """
    metrics = compute_metrics(y_true, probs, classes, positive_class, threshold)
    metrics.pop("roc", None)
    result = {"n": metrics.pop("n"), "groups": int(len(set(map(str, groups)))), "protocol": protocol, **metrics}
    result["ci95"] = bootstrap_intervals(y_true, probs, groups, classes, positive_class, threshold, samples, seed)
    result["bootstrap"] = {"samples": samples, "seed": seed, "resampling": "groups"}
    return result


def estimates_by(
    subsets: Sequence[str],
    y_true: Sequence[int],
    probs: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    protocol: str,
    positive_class: str | None = None,
    samples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, dict]:
    """:func:`estimate` of all images and of each subset of them (e.g. each data source).

    Args:
        subsets: the subset name of each image.
        y_true, probs, groups, classes, positive_class, samples, seed: see :func:`estimate`.
        protocol: how the predictions were obtained; each subset's protocol names the subset too.

    Returns:
        ``{"all": estimate, subset: estimate, ...}``, subsets in sorted order; each subset's groups
        are resampled within it (a group spanning two subsets contributes its members to each).
    """
    subsets = np.asarray(subsets, dtype=object).astype(str)
    y_true, probs, groups = np.asarray(y_true), np.asarray(probs), np.asarray(groups, dtype=object).astype(str)
    result = {"all": estimate(y_true, probs, groups, classes, protocol, positive_class, None, samples, seed)}
    for name in sorted(set(subsets)):
        mask = subsets == name
        if mask.all():  # one subset: the same figures as all images (the bootstrap is the costly part)
            result[name] = {**result["all"], "protocol": f"{protocol} Subset: all {int(mask.sum())} images ({name})."}
            continue
        result[name] = estimate(y_true[mask], probs[mask], groups[mask], classes,
                                f"{protocol} Subset: the {int(mask.sum())} images of {name}.", positive_class, None,
                                samples, seed)
    return result


def paired_differences(y_true: Sequence[int], probs_a: np.ndarray, probs_b: np.ndarray, groups: Sequence[str],
                       classes: Sequence[str], positive_class: str | None = None, samples: int = DEFAULT_BOOTSTRAP,
                       seed: int = 0, metrics: Sequence[str] = ("auc", "accuracy", "macro_f1")) -> dict[str, dict]:
    """``metric(a) - metric(b)`` on the same images with a paired group-bootstrap 95% interval.

    Returns:
        ``{metric: {"difference": d, "ci95": [lo, hi], "share_above_zero": p}}`` (p: resamples with d > 0).
    """
    y_true = np.asarray(y_true)

    def difference(index) -> dict[str, float]:
        a = compute_metrics(y_true[index], probs_a[index], classes, positive_class, curves=False)
        b = compute_metrics(y_true[index], probs_b[index], classes, positive_class, curves=False)
        return {m: a[m] - b[m] for m in metrics if a.get(m) is not None and b.get(m) is not None}

    observed = difference(np.arange(len(y_true)))
    draws: dict[str, list[float]] = {m: [] for m in observed}
    with _light_validation():
        for index in group_resamples(groups, samples, seed):
            for name, value in difference(index).items():
                draws[name].append(value)
    return {name: {"difference": float(observed[name]), "ci95": [float(np.percentile(draws[name], 2.5)),
                                                                 float(np.percentile(draws[name], 97.5))],
                   "share_above_zero": float(np.mean(np.asarray(draws[name]) > 0))} for name in observed}
