"""A fold ensemble's estimate across fold partitions: repeated cross-validation of its own recipe.

One K-fold partition of a few hundred images is one draw: which images share a held-out fold moves
the out-of-fold figures by more than their bootstrap interval shows. ``covidscan cv --repeats R``
measures that, but its ensemble holds all R*K fold models. :func:`attach_repeated_estimate` keeps a
bundle built from one partition (``covidscan cv``'s ``model/``) and records in its card, as
``metrics.repeated_estimate``, the estimate of a repeated run of the same recipe whose first repeat
is the bundle's own fold models (checked: their out-of-fold logits must be identical). The run's
``oof.csv`` is stored beside the card as ``oof-repeats.csv``, so the figures reproduce
(:func:`covidscan.oof.estimate_from_bundle` with ``key="repeated_estimate"``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from covidscan.errors import TrainingError
from covidscan.utils import atomic_write_text

REPEATS_FILE = "oof-repeats.csv"


def attach_repeated_estimate(bundle_dir: str | os.PathLike, cv_dir: str | os.PathLike) -> dict:
    """Record a repeated cross-validation of a fold ensemble's recipe in the ensemble's card.

    Args:
        bundle_dir: a fold ensemble written by ``covidscan cv`` (card with ``metrics.estimate``, ``oof.csv``).
        cv_dir: a ``covidscan cv --repeats R`` output folder (R >= 2) whose repeat 0 is that ensemble's folds.

    Returns:
        The card's new ``metrics.repeated_estimate``: the estimate over all repeats (each image's
        probabilities averaged over them), ``per_repeat`` figures, and the stored predictions' file.

    Raises:
        TrainingError: the run has one repeat, or its repeat 0 is not the bundle's fold models.
    """
    from covidscan.bundle import CARD_FILE, read_card
    from covidscan.oof import OOF_FILE, oof_estimate, parse_oof_csv, read_oof_csv

    bundle_dir, cv_dir = Path(bundle_dir), Path(cv_dir)
    card = read_card(bundle_dir)
    shipped = (card.metrics or {}).get("estimate")
    if not shipped or not (bundle_dir / OOF_FILE).is_file():
        raise TrainingError(f"{bundle_dir} is not a cross-validated fold ensemble (no estimate or {OOF_FILE}).")
    if not (cv_dir / OOF_FILE).is_file():
        raise TrainingError(f"{cv_dir} holds no {OOF_FILE}: give the folder of a finished covidscan cv run.")
    text = (cv_dir / OOF_FILE).read_text()
    rows, classes = parse_oof_csv(text)
    repeats = sorted({row.repeat for row in rows})
    if len(repeats) < 2:
        raise TrainingError(f"{cv_dir} is a cross-validation with one repeat; run covidscan cv --repeats 2 or more.")
    own_rows, own_classes = read_oof_csv(bundle_dir / OOF_FILE)
    if own_classes != classes or _keyed(own_rows) != _keyed([row for row in rows if row.repeat == 0]):
        raise TrainingError(f"The first repeat of {cv_dir} is not the fold models of {bundle_dir}: their "
                            "out-of-fold predictions differ. Run the bundle's own recipe and folds with --repeats.")
    run_estimate = json.loads((cv_dir / "model" / CARD_FILE).read_text())["metrics"]["estimate"]
    protocol = (f"{run_estimate['protocol']} Repeat 0's fold models are this ensemble; the other repeats' "
                "(reshuffled folds, their own training seeds) are not shipped.")
    result = oof_estimate(rows, classes, card.positive_class, protocol, run_estimate["bootstrap"]["samples"],
                          run_estimate["bootstrap"]["seed"])
    result["predictions"] = {"file": REPEATS_FILE, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                             "rows": len(rows)}
    atomic_write_text(bundle_dir / REPEATS_FILE, text)
    data = json.loads((bundle_dir / CARD_FILE).read_text())
    data.setdefault("metrics", {})["repeated_estimate"] = result
    atomic_write_text(bundle_dir / CARD_FILE, json.dumps(data, indent=2) + "\n")
    return result


def _keyed(rows) -> dict:
    return {(row.path, row.fold): (row.group, row.label_index, tuple(row.logits)) for row in rows}
