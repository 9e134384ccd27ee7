"""Out-of-fold (OOF) predictions: the rows, their CSV, the estimate made from them, two runs compared.

Every :func:`covidscan.cv.cross_validate` image is predicted once per repeat by the fold model that
never saw it (an :class:`OOFRow`). ``oof.csv`` stores the raw logits (:func:`oof_csv`), so an estimate
always recomputes from what is stored (:func:`estimate_from_bundle`): each fold's temperature fitted
on the other folds' rows, repeats averaged per image, group-bootstrap intervals (:func:`oof_estimate`).
:func:`compare_oof` sets two runs over the same images side by side with paired intervals;
:func:`average_oof` joins runs into one (an ensemble of their models, measured out of fold);
:func:`threshold_check` asks whether a decision threshold fitted out of fold would beat the argmax.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from covidscan.errors import TrainingError
from covidscan.estimate import DEFAULT_BOOTSTRAP, HEADLINE_METRICS, estimate

OOF_FILE = "oof.csv"


@dataclass
class OOFRow:
    """One held-out image's prediction from the fold model that never saw it."""

    path: str
    group: str
    label_index: int
    repeat: int
    fold: int
    logits: list[float]


def row_key(row: OOFRow) -> tuple[str, int, int]:
    """Which held-out prediction a row is: its image, fold partition and fold."""
    return row.path, row.repeat, row.fold


def rows_by_key(rows: Sequence[OOFRow]) -> dict[tuple[str, int, int], tuple[str, int, tuple[float, ...]]]:
    """Each row's group, label and logits keyed by :func:`row_key`: two lists of rows hold the same
    predictions exactly when these are equal, whatever their order."""
    return {row_key(row): (row.group, row.label_index, tuple(row.logits)) for row in rows}


def cross_fitted_probabilities(rows: Sequence[OOFRow]) -> np.ndarray:
    """Calibrated OOF probabilities: each fold's temperature fitted on the other folds' OOF logits.

    Returns:
        N x C probabilities in row order.
    """
    import torch

    from covidscan.evaluation import fit_temperature

    logits = torch.tensor([row.logits for row in rows], dtype=torch.float32)
    labels = np.array([row.label_index for row in rows])
    keys = np.array([(row.repeat, row.fold) for row in rows])
    probs = np.zeros(logits.shape, dtype=np.float64)
    for repeat, fold in sorted({tuple(k) for k in keys.tolist()}):
        mine = (keys[:, 0] == repeat) & (keys[:, 1] == fold)
        others = (keys[:, 0] == repeat) & ~mine
        temperature = fit_temperature(logits[others], labels[others].tolist())
        probs[mine] = torch.softmax(logits[mine] / temperature, dim=1).numpy()
    return probs


def per_image(rows: Sequence[OOFRow], probs: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Each image's probabilities averaged over repeats (no repeat's model saw it).

    Returns:
        (paths, labels, N x C probabilities, groups), one entry per image in first-seen order.
    """
    order: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        order.setdefault(row.path, []).append(index)
    paths = list(order)
    mean = np.stack([probs[order[p]].mean(axis=0) for p in paths])
    labels = np.array([rows[order[p][0]].label_index for p in paths])
    groups = [rows[order[p][0]].group for p in paths]
    return paths, labels, mean, groups


def oof_estimate(rows: Sequence[OOFRow], classes: Sequence[str], positive_class: str | None, protocol: str,
                 samples: int, seed: int = 0) -> dict:
    """The estimate from OOF rows: cross-fitted temperature, repeats averaged, group-bootstrap intervals.

    Decisions are the argmax of the probabilities (the models' own rule without a tuned threshold).
    With more than one repeat, ``per_repeat`` holds each repeat's own estimate (its fold models alone):
    how far the figures move when the same images are partitioned into folds differently.
    """
    _, labels, mean, groups = per_image(rows, cross_fitted_probabilities(rows))
    result = estimate(labels, mean, groups, classes, protocol, positive_class, None, samples, seed)
    repeats = sorted({row.repeat for row in rows})
    if len(repeats) > 1:
        result["per_repeat"] = [
            {"repeat": repeat, **{key: value for key, value in oof_estimate(
                [row for row in rows if row.repeat == repeat], classes, positive_class, protocol, samples, seed).items()
                if key in _REPEAT_FIELDS}} for repeat in repeats]
    return result


def estimate_of_stored(text: str, positive_class: str | None, protocol: str, samples: int, seed: int = 0,
                       file: str = OOF_FILE) -> tuple[dict, list[OOFRow], list[str]]:
    """:func:`oof_estimate` of exactly the predictions stored as ``text`` (an ``oof.csv``), with the
    record of that file (``predictions``: its name, sha256 and rows) that lets the estimate be checked.

    Returns:
        (the estimate, the rows parsed from ``text``, their classes).
    """
    rows, classes = parse_oof_csv(text)
    result = oof_estimate(rows, classes, positive_class, protocol, samples, seed)
    result["predictions"] = {"file": file, "sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": len(rows)}
    return result, rows, classes


# What each repeat's own estimate keeps: the headline figures and their intervals.
_REPEAT_FIELDS = ("n", "groups", "accuracy", "macro_f1", "sensitivity", "specificity", "precision", "f1", "auc", "ece",
                  "ci95")


def oof_csv(rows: Sequence[OOFRow], classes: Sequence[str]) -> str:
    """The OOF rows as CSV text (raw logits; everything the estimate is computed from)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "group", "label_index", "repeat", "fold", *[f"logit[{c}]" for c in classes]])
    for row in rows:
        writer.writerow([row.path, row.group, row.label_index, row.repeat, row.fold, *[f"{v:.9g}" for v in row.logits]])
    return buffer.getvalue()


def read_oof_csv(path: str | os.PathLike) -> tuple[list[OOFRow], list[str]]:
    """OOF rows and class names back from :func:`oof_csv` text written to ``path``."""
    return parse_oof_csv(Path(path).read_text())


def parse_oof_csv(text: str) -> tuple[list[OOFRow], list[str]]:
    """OOF rows and class names from :func:`oof_csv` text."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    classes = [name[len("logit["):-1] for name in header[5:]]
    rows = [OOFRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), [float(v) for v in r[5:]]) for r in reader]
    return rows, classes


def _oof_file(path: str | os.PathLike) -> Path:
    """An ``oof.csv`` itself, or the one in a cross-validation folder or cross-validated bundle."""
    path = Path(path)
    return path / OOF_FILE if path.is_dir() else path


def compare_oof(a: str | os.PathLike, b: str | os.PathLike, samples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                positive_class: str | None = None) -> dict:
    """Two recipes' out-of-fold predictions of the same images compared: ``a`` minus ``b``, paired.

    Each side's probabilities are made as for its estimate (cross-fitted temperature, repeats
    averaged); the difference of every headline metric gets a group-bootstrap 95% interval that
    resamples the same groups for both, so it is far narrower than either estimate's own interval.

    Args:
        a, b: a ``covidscan cv`` folder, a cross-validated bundle, or an ``oof.csv``.
        samples: bootstrap resamples.
        seed: bootstrap seed.
        positive_class: the class of sensitivity and specificity (default: COVID, as in estimates).

    Returns:
        ``{"n", "groups", "a", "b", "differences": {metric: {"difference", "ci95", "share_above_zero"}}}``
        with each side's figures (``a`` and ``b``: auc, accuracy, macro_f1, sensitivity, specificity).

    Raises:
        TrainingError: a side without OOF predictions, or two sides over different images, labels or classes.
    """
    from covidscan.estimate import check_bootstrap_samples, paired_differences
    from covidscan.training.data import default_positive_class

    check_bootstrap_samples(samples)
    sides = {}
    for name, path in (("a", a), ("b", b)):
        file = _oof_file(path)
        rows, classes = _read_run(file)
        paths, labels, probs, groups = per_image(rows, cross_fitted_probabilities(rows))
        sides[name] = {"file": str(file), "classes": classes, "order": {p: i for i, p in enumerate(paths)},
                       "labels": labels, "probs": probs, "groups": groups, "rows": rows}
    first, second = sides["a"], sides["b"]
    _check_same_images(first["rows"], first["classes"], second["rows"], second["classes"], "compared pairwise")
    index = np.array([second["order"][p] for p in first["order"]])
    classes = first["classes"]
    positive = positive_class or default_positive_class(classes)

    probs_b = second["probs"][index]
    labels = first["labels"]
    return {"n": len(labels), "groups": len(set(first["groups"])),
            "a": {"file": first["file"], **_figures(labels, first["probs"], classes, positive, HEADLINE_METRICS)},
            "b": {"file": second["file"], **_figures(labels, probs_b, classes, positive, HEADLINE_METRICS)},
            "bootstrap": {"samples": samples, "seed": seed},
            "differences": paired_differences(first["labels"], first["probs"], probs_b, first["groups"], classes,
                                              positive, samples, seed, HEADLINE_METRICS)}


def threshold_check(run: str | os.PathLike, samples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                    positive_class: str | None = None) -> dict:
    """Would a decision threshold fitted out of fold beat the argmax? Cross-fitted, paired against it.

    Each fold's images are decided by the positive-class threshold that maximises accuracy on the
    other folds' out-of-fold probabilities (:func:`covidscan.training.tune_threshold`), so no image
    helps choose its own threshold; the figures are compared with argmax decisions on the same images
    by a paired group bootstrap. Probabilities are made as for the estimate (cross-fitted temperature,
    repeats averaged).

    Args:
        run: a ``covidscan cv`` folder, a cross-validated bundle, or an ``oof.csv`` of a two-class task
            with one fold partition (a joined run's runs share their folds).
        samples: bootstrap resamples.
        seed: bootstrap seed.
        positive_class: the thresholded class (default: the COVID class).

    Returns:
        ``{"n", "groups", "positive_class", "thresholds": {fold: t}, "threshold_all_folds", "argmax": figures,
        "threshold": figures, "differences": {metric: {"difference", "ci95", "share_above_zero"}}}``:
        figures are accuracy, macro F1, sensitivity and specificity; differences are threshold minus argmax.

    Raises:
        TrainingError: no OOF predictions, not two classes, no positive class, or images in different
            folds across repeats (a threshold cross-fitted by fold needs one partition).
    """
    from scipy.special import expit, logit

    from covidscan.estimate import check_bootstrap_samples, paired_differences
    from covidscan.training import tune_threshold
    from covidscan.training.data import default_positive_class

    check_bootstrap_samples(samples)
    rows, classes = _read_run(_oof_file(run))
    if len(classes) != 2:
        raise TrainingError(f"A decision threshold is for two-class models; this run has {len(classes)} classes.")
    positive = positive_class or default_positive_class(classes)
    if positive not in classes:
        raise TrainingError(f"Name the class to threshold: one of {', '.join(classes)}.")
    folds: dict[str, set[int]] = {}
    for row in rows:
        folds.setdefault(row.path, set()).add(row.fold)
    if any(len(found) > 1 for found in folds.values()):
        raise TrainingError("These predictions hold several fold partitions (cv --repeats); a threshold cross-fitted "
                            "by fold needs one. Give the run's first partition (its oof.csv).")
    paths, labels, probs, groups = per_image(rows, cross_fitted_probabilities(rows))
    fold = np.array([next(iter(folds[path])) for path in paths])
    index = classes.index(positive)
    thresholds = {int(k): tune_threshold(labels[fold != k], probs[fold != k], index) for k in np.unique(fold)}
    # Shift each image's positive-class log-odds by its fold's threshold: argmax of the shifted
    # probabilities is "positive when p >= t", so the paired bootstrap compares decisions as they are.
    clipped = np.clip(probs[:, index], 1e-9, 1 - 1e-9)
    t = np.clip(np.array([thresholds[k] for k in fold]), 1e-9, 1 - 1e-9)
    shifted = expit(logit(clipped) - logit(t) + 1e-12)
    decided = np.empty_like(probs)
    decided[:, index], decided[:, 1 - index] = shifted, 1 - shifted
    names = ("accuracy", "macro_f1", "sensitivity", "specificity")
    return {"n": len(labels), "groups": len(set(groups)), "positive_class": positive, "thresholds": thresholds,
            "threshold_all_folds": tune_threshold(labels, probs, index),
            "argmax": _figures(labels, probs, classes, positive, names),
            "threshold": _figures(labels, decided, classes, positive, names),
            "bootstrap": {"samples": samples, "seed": seed},
            "differences": paired_differences(labels, decided, probs, groups, classes, positive, samples, seed, names)}


def _figures(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: str | None,
             names: Sequence[str]) -> dict:
    """The named metrics of one set of probabilities (those it has: AUC needs both classes present)."""
    from covidscan.evaluation import compute_metrics

    metrics = compute_metrics(labels, probs, classes, positive)
    return {name: metrics[name] for name in names if metrics.get(name) is not None}


def _read_run(file: Path) -> tuple[list[OOFRow], list[str]]:
    if not file.is_file():
        raise TrainingError(f"No out-of-fold predictions at {file}: give a covidscan cv folder, a cross-validated "
                            "model or an oof.csv.")
    return read_oof_csv(file)


def _check_same_images(rows_a: Sequence[OOFRow], classes_a: Sequence[str], rows_b: Sequence[OOFRow],
                       classes_b: Sequence[str], purpose: str) -> None:
    """Raise TrainingError unless two runs predicted the same images, with the same classes and labels."""
    labels_a, labels_b = ({row.path: row.label_index for row in rows} for rows in (rows_a, rows_b))
    if list(classes_a) != list(classes_b) or set(labels_a) != set(labels_b):
        raise TrainingError("The two runs' out-of-fold predictions are not of the same images and classes; only runs "
                            f"over the same pooled images can be {purpose}.")
    if any(labels_b[path] != label for path, label in labels_a.items()):
        raise TrainingError("The two runs label the same images differently.")


def joined_repeat(repeat: int, run: int, runs: int) -> int:
    """The repeat number that run ``run``'s repeat ``repeat`` takes when ``runs`` runs are joined as one
    (:func:`average_oof`): the runs interleave per fold partition, so the first ``runs`` repeats are
    each run's first partition."""
    return repeat * runs + run


def average_oof(runs: Sequence[str | os.PathLike]) -> tuple[list[OOFRow], list[str]]:
    """Several runs over the same images as one: an ensemble of all their fold models, measured out of fold.

    Each run's rows become repeats of one run, so the estimate made from them (:func:`oof_estimate`,
    :func:`compare_oof`, ``oof.csv``) averages every image's calibrated probabilities over the runs'
    models that never saw it: what shipping all their fold models together would answer. Runs may mix
    recipes, sizes, backbones and fold partitions. Of J runs, run j's repeat r becomes repeat
    r * J + j: the first J repeats are each run's first partition, in the order given (for runs of
    one repeat: run j is repeat j).

    Args:
        runs: two or more ``covidscan cv`` folders, cross-validated bundles or ``oof.csv`` files.

    Returns:
        (rows, classes) for :func:`oof_csv`.

    Raises:
        TrainingError: fewer than two runs, a run without OOF predictions, or runs over different images,
            labels or classes.
    """
    if len(runs) < 2:
        raise TrainingError("Give at least two runs to average.")
    first_rows, classes = _read_run(_oof_file(runs[0]))
    joined = []
    for index, run in enumerate(runs):
        rows, run_classes = _read_run(_oof_file(run)) if index else (first_rows, classes)
        _check_same_images(first_rows, classes, rows, run_classes, "averaged")
        joined += [OOFRow(row.path, row.group, row.label_index, joined_repeat(row.repeat, index, len(runs)), row.fold,
                          row.logits)
                   for row in rows]
    return joined, classes


def estimate_from_bundle(bundle_dir: str | os.PathLike, key: str = "estimate") -> dict:
    """Recompute a cross-validated bundle's ``metrics[key]`` from the OOF predictions it stores.

    Args:
        bundle_dir: the bundle folder.
        key: ``"estimate"`` (from ``oof.csv``) or ``"repeated_estimate"`` (see :mod:`covidscan.repeats`);
            the file is the one the estimate's ``predictions`` names.
    """
    from covidscan.bundle import read_card

    bundle_dir = Path(bundle_dir)
    card = read_card(bundle_dir)
    stored = card.metrics.get(key)
    if not stored:
        raise TrainingError(f"The bundle {bundle_dir} has no cross-validated {key.replace('_', ' ')}.")
    rows, classes = read_oof_csv(bundle_dir / Path((stored.get("predictions") or {}).get("file", OOF_FILE)).name)
    recomputed = oof_estimate(rows, classes, card.positive_class, stored["protocol"], stored["bootstrap"]["samples"],
                              stored["bootstrap"]["seed"])
    # A joined model's estimate says how many runs its repeats interleave (a label, not a figure).
    runs = {"runs": stored["runs"]} if "runs" in stored else {}
    return {**recomputed, "predictions": stored.get("predictions"), **runs}
