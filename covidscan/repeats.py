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

import json
import os
from pathlib import Path
from typing import Sequence

from covidscan.errors import TrainingError
from covidscan.utils import atomic_write_text

REPEATS_FILE = "oof-repeats.csv"


def attach_repeated_estimate(bundle_dir: str | os.PathLike, cv_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> dict:
    """Record a repeated cross-validation of a fold ensemble's recipe in the ensemble's card.

    Args:
        bundle_dir: a fold ensemble written by ``covidscan cv`` (card with ``metrics.estimate``, ``oof.csv``),
            or by ``covidscan cv-join`` from several runs.
        cv_dir: a ``covidscan cv --repeats R`` output folder (R >= 2) whose repeat 0 is that ensemble's folds;
            for a joined ensemble, one such folder per joined run, in the order they were joined
            (joined as :func:`covidscan.oof.average_oof` joins them).

    Returns:
        The card's new ``metrics.repeated_estimate``: the estimate over all repeats (each image's
        probabilities averaged over them), ``per_repeat`` figures, and the stored predictions' file.

    Raises:
        TrainingError: the runs add no fold partition beyond the bundle's own, or their first repeats are
            not its fold models.
    """
    from covidscan.bundle import CARD_FILE, read_card
    from covidscan.oof import (OOF_FILE, average_oof, estimate_of_stored, oof_csv, parse_oof_csv, read_oof_csv,
                               rows_by_key)

    bundle_dir = Path(bundle_dir)
    cv_dirs = [Path(cv_dir)] if isinstance(cv_dir, (str, os.PathLike)) else [Path(d) for d in cv_dir]
    card = read_card(bundle_dir)
    shipped = (card.metrics or {}).get("estimate")
    if not shipped or not (bundle_dir / OOF_FILE).is_file():
        raise TrainingError(f"{bundle_dir} is not a cross-validated fold ensemble (no estimate or {OOF_FILE}).")
    for folder in cv_dirs:
        if not (folder / OOF_FILE).is_file():
            raise TrainingError(f"{folder} holds no {OOF_FILE}: give the folder of a finished covidscan cv run.")
    if len(cv_dirs) == 1:
        text = (cv_dirs[0] / OOF_FILE).read_text()
    else:
        text = oof_csv(*average_oof(cv_dirs))
    rows, classes = parse_oof_csv(text)
    own_rows, own_classes = read_oof_csv(bundle_dir / OOF_FILE)
    # The bundle's own repeats: 1 for one run's fold models, one per run for a joined ensemble, R for cv --repeats R.
    own_repeats = len({row.repeat for row in own_rows})
    run_repeats = len({row.repeat for row in rows})
    if run_repeats <= own_repeats:
        raise TrainingError(f"{', '.join(map(str, cv_dirs))}: no fold partition beyond the model's own; run "
                            f"covidscan cv --repeats {own_repeats + 1 if len(cv_dirs) == 1 else 2} or more.")
    own_partitions = [row for row in rows if row.repeat < own_repeats]
    if own_classes != classes or rows_by_key(own_rows) != rows_by_key(own_partitions):
        raise TrainingError(f"The first repeat of {', '.join(map(str, cv_dirs))} is not the fold models of "
                            f"{bundle_dir}: their out-of-fold predictions differ. Run the bundle's own recipe and "
                            "folds with --repeats.")
    if len(cv_dirs) == 1:
        from covidscan.cv import fold_ensemble_sentence

        run_estimate = json.loads((cv_dirs[0] / "model" / CARD_FILE).read_text())["metrics"]["estimate"]
        # The run's own closing sentence speaks of its ensemble of every partition; this card ships the first ones.
        run_protocol = run_estimate["protocol"].replace(fold_ensemble_sentence(run_repeats), "").strip()
        own = "repeat 0" if own_repeats == 1 else f"repeats 0-{own_repeats - 1}"
        protocol = (f"{run_protocol} Figures are for {run_repeats} fold models per image (one per fold partition). "
                    f"The fold models of {own} are this ensemble; the other repeats' (reshuffled folds, their own "
                    "training seeds) are not shipped.")
        bootstrap = run_estimate["bootstrap"]
    else:
        partitions = run_repeats // own_repeats
        protocol = (f"{shipped['protocol']} Repeated: each joined run also cross-validated on reshuffled folds "
                    f"({partitions} partitions in all, their own training seeds); each image's probabilities are "
                    f"averaged over every run and partition. Repeats 0-{own_repeats - 1} are this ensemble's fold "
                    "models; the others are not shipped.")
        bootstrap = shipped["bootstrap"]
    result, _, _ = estimate_of_stored(text, card.positive_class, protocol, bootstrap["samples"], bootstrap["seed"],
                                      REPEATS_FILE)
    if len(cv_dirs) > 1:
        result["runs"] = own_repeats  # per_repeat r: joined run r % runs on partition r // runs
    atomic_write_text(bundle_dir / REPEATS_FILE, text)
    data = json.loads((bundle_dir / CARD_FILE).read_text())
    data.setdefault("metrics", {})["repeated_estimate"] = result
    atomic_write_text(bundle_dir / CARD_FILE, json.dumps(data, indent=2) + "\n")
    return result
