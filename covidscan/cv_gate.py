"""A cross-validation ensemble's input gate, fitted out of fold (see :mod:`covidscan.cv`, :mod:`covidscan.gate`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from covidscan.cv import HOLDOUT
from covidscan.oof import OOF_FILE, cross_fitted_probabilities, per_image, read_oof_csv
from covidscan.datasets import open_dataset
from covidscan.errors import TrainingError


def fit_cv_gate(cv_dir: str | os.PathLike, root: str | os.PathLike | None = None, taps: Sequence[str] = (),
                combine: str = "max", score_head: bool = True, pass_rate: float = 0.99, device: str = "cpu") -> dict:
    """Fit (or refit) a cross-validation ensemble's input gate and uncertainty summary out of fold.

    Each fold model's statistics come from the images it trained on, its scale and the threshold
    from its held-out fold (:func:`covidscan.gate.fit_gate_out_of_fold`); the selective-prediction
    summary from the cross-fitted OOF probabilities in ``oof.csv``. The weights are not touched.

    Args:
        cv_dir: a finished :func:`cross_validate` output folder (``cv.json``, fold runs, ``model/``).
        root: the dataset folder, when it has moved since the run (default: the one in ``cv.json``).
        taps, combine, score_head, pass_rate: see :func:`covidscan.gate.fit_gate`.
        device: where the fold models compute their features.

    Returns:
        The ensemble card's new ``gate`` field.
    """
    cv_dir = Path(cv_dir)
    try:
        record = json.loads((cv_dir / "cv.json").read_text())
        train_config = record["train_config"]
        runs = fold_runs(cv_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(f"{cv_dir} is not a finished cross-validation folder ({exc}).") from None
    return fit_fold_gate(cv_dir / "model", [(cv_dir, run) for run in runs], train_config, root, taps, combine,
                         score_head, pass_rate, device,
                         measured_on="out-of-fold predictions (one fold model each, cross-fitted temperature)")


def fold_runs(cv_dir: Path) -> list[str]:
    """A cross-validation folder's fold runs (``r0-f0``, ``r0-f1``, ...) in the order its ensemble holds them."""
    return sorted(p.stem for p in (cv_dir / "splits").glob("r*-f*.json"))


def fit_fold_gate(model_dir: Path, runs: Sequence[tuple[Path, str]], train_config: dict,
                  root: str | os.PathLike | None = None, taps: Sequence[str] = (), combine: str = "max",
                  score_head: bool = True, pass_rate: float = 0.99, device: str = "cpu",
                  measured_on: str = "out-of-fold predictions") -> dict:
    """Fit the input gate of an ensemble of fold models out of fold (see :func:`fit_cv_gate`).

    Args:
        model_dir: the ensemble bundle; its members are the fold runs' models in ``runs`` order, and
            its ``oof.csv`` gives the uncertainty summary.
        runs: (cross-validation folder, fold run name) of each member; every folder splits the same
            pooled images of ``train_config``'s dataset.
        train_config: the recorded training config (``dataset``, ``root``, ``dataset_options``).
        root, taps, combine, score_head, pass_rate, device: see :func:`fit_cv_gate`.
        measured_on: what the uncertainty summary's probabilities are, for the card.

    Returns:
        The ensemble card's new ``gate`` field.
    """
    from covidscan.bundle import load_bundle, read_card, round_to_stored
    from covidscan.datasets import load_split_images
    from covidscan.gate import feature_layers, fit_gate_out_of_fold, split_features, write_gate

    if not runs or not (model_dir / "card.json").is_file():
        raise TrainingError(f"No fold splits or no ensemble at {model_dir} to fit a gate for.")
    root = root or train_config["root"]
    base_options = {k: v for k, v in train_config.get("dataset_options", {}).items() if k != "split_file"}
    bundles = [load_bundle(cv_dir / run / "model", device=device) for cv_dir, run in runs]
    stored = read_card(model_dir).weights_dtype
    for bundle in bundles:
        round_to_stored(bundle.model, stored)  # the features the ensemble's stored members compute
        feature_layers(bundle.model, taps)  # an unknown tap fails before any image is decoded
    # Every fold run splits the same pooled images, so they are decoded once and indexed per fold.
    split_options = [{**base_options, "split_file": str(cv_dir / "splits" / f"{run}.json")} for cv_dir, run in runs]
    pooled = open_dataset(train_config["dataset"], root, split=None, **split_options[0])
    # Images no fold lists (a test split) are never decoded.
    pooled.items, pooled.raw_metadata = [item for item in pooled.items if item.split], []
    # At the ensemble's inference size, which cross-validation may have chosen above the training size.
    images = load_split_images(pooled, read_card(model_dir).input_size, window=bundles[0].card.dicom_window,
                               crop=bundles[0].card.crop)
    index = {item.path: i for i, item in enumerate(pooled.items)}
    fold_train, fold_holdout = [], []
    for bundle, options in zip(bundles, split_options):
        assignment = open_dataset(train_config["dataset"], root, split=None, **options)
        sets = {}
        for split in ("train", "val", HOLDOUT):
            rows = [index[item.path] for item in assignment.items if item.split == split]
            sets[split], _ = split_features(bundle.model, images[rows], bundle.card.mean, bundle.card.std, device,
                                            taps=taps)
        fold_train.append([np.concatenate([t, v]) for t, v in zip(sets["train"], sets["val"])])
        fold_holdout.append(sets[HOLDOUT])
    gate = fit_gate_out_of_fold(fold_train, fold_holdout, pass_rate=pass_rate, taps=taps, combine=combine,
                                score_head=score_head)
    extra = {"fit": {"dataset": train_config["dataset"], "root": Path(root).name, "options": base_options,
                     "statistics_split": "each fold model's training folds", "threshold_split": "out-of-fold"},
             "uncertainty": oof_uncertainty(read_oof_csv(model_dir / OOF_FILE)[0], measured_on)}
    return write_gate(model_dir, gate, extra)


def oof_uncertainty(rows, measured_on: str) -> dict:
    """The gate card's uncertainty record: how accuracy rises as the least certain out-of-fold images are left out.

    Args:
        rows: the ensemble's out-of-fold rows (its ``oof.csv``).
        measured_on: what the probabilities are, for the card.
    """
    from covidscan.gate import prediction_uncertainty, selective_sentence, selective_summary

    _, labels, probs, _ = per_image(rows, cross_fitted_probabilities(rows))
    selective = selective_summary(prediction_uncertainty(probs), probs.argmax(axis=1) == labels)
    return {"definition": "entropy of the members' mean probabilities / log C (mean member entropy + Jensen-Shannon disagreement)",
            "measured_on": measured_on,
            "selective": selective,
            "summary": selective_sentence(selective, images="out-of-fold images")}
