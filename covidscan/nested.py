"""Fold ensemble or refit? Nested cross-validation of a cross-validated bundle's own recipe.

A :func:`covidscan.cv.cross_validate` bundle ships its K fold models as one ensemble; the other way
to ship is one model refitted on all pooled images with the same schedule. Which is better cannot
be read off the bundle's estimate (that is one fold model per image), so it is measured here, out of
fold: for each outer fold k of the bundle's own ``oof.csv``,

* **single model** (the refit's analogue): the bundle's member k, trained by the recipe on all the
  other folds' images, scores fold k;
* **fold ensemble** (the shipped way's analogue): an inner ``inner_folds``-fold cross-validation of
  the same recipe over those same images yields an ensemble of fold models, which scores fold k.

Both score fold k at the inference size the inner cross-validation chose (the refit would take the
CV-chosen size too), and both estimates use the same cross-fitted temperature and group bootstrap,
so their paired difference is a fair comparison. The recipe comes from the bundle's card (its
``covidscan cv`` command), so nothing but the bundle and the data is needed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from covidscan.cv import HOLDOUT, CVOptions, cross_validate, pooled_dataset
from covidscan.oof import OOF_FILE, OOFRow, oof_csv, oof_estimate
from covidscan.errors import TrainingError
from covidscan.estimate import paired_differences
from covidscan.utils import atomic_write_text, resolve_device, sigterm_stops

NESTED_FILE = "nested.json"


def recipe_from_card(card, root: str | os.PathLike | None = None):
    """The TrainConfig and CVOptions of the ``covidscan cv`` command recorded in a bundle's card.

    Args:
        card: a cross-validated bundle's :class:`~covidscan.bundle.ModelCard`.
        root: the dataset folder, if it is not where the recorded command found it.

    Raises:
        TrainingError: the card records no ``covidscan cv`` command.
    """
    command = (card.training or {}).get("command") or ""
    if command.startswith("covidscan cv-join "):
        raise TrainingError(f"The model {card.name} joins several cross-validation runs (covidscan cv-join); nested "
                            "cross-validation needs the one recipe of a covidscan cv model.")
    return recipe_from_command(command, root, f"The model {card.name}")


def recipe_from_command(command: str, root: str | os.PathLike | None = None, what: str = "The command"):
    """The TrainConfig and CVOptions of a recorded ``covidscan cv`` command line.

    Raises:
        TrainingError: ``command`` is not a ``covidscan cv`` command.
    """
    import shlex

    from covidscan.cli import build_parser
    from covidscan.cli.cv import cv_options_from_args
    from covidscan.cli.train import config_from_args

    argv = shlex.split(command)
    if argv[:2] != ["covidscan", "cv"]:
        raise TrainingError(f"{what} was not made by `covidscan cv` (its card records "
                            f"{command or 'no command'!r}); nested cross-validation needs that recipe.")
    args = build_parser("cv").parse_args(argv[1:])
    args.argv = argv[1:]  # the config records the card's command, not this process's
    config, options = config_from_args(args), cv_options_from_args(args)
    if root is not None:
        config.root = str(root)
    return config, options


def nested_cv(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike, inner_folds: int = 3,
              root: str | os.PathLike | None = None, outer_folds: Sequence[int] | None = None,
              stop_event: threading.Event | None = None) -> dict | None:
    """Compare a cross-validated bundle's fold ensemble with a single refitted model, out of fold.

    Args:
        bundle_dir: a bundle written by :func:`covidscan.cv.cross_validate` (card, members, ``oof.csv``).
        out_dir: where the inner cross-validations and ``nested.json`` go (created).
        inner_folds: folds of each inner cross-validation (the ensemble's size).
        root: the dataset folder, if it moved since the bundle was made.
        outer_folds: only these outer folds (all by default): a cheaper, noisier comparison on their images.
        stop_event: set it (or send SIGTERM) to stop after the current training step.

    Returns:
        The record written to ``nested.json`` (both estimates, their paired differences, the sizes
        chosen), or None when cancelled.

    Raises:
        CovidscanError: the bundle is not a single-repeat cross-validated ensemble, or its data is missing.
    """
    from covidscan.bundle import load_bundle
    from covidscan.oof import read_oof_csv
    from covidscan.datasets import write_split_file

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if inner_folds < 2:
        raise TrainingError("The inner cross-validation needs at least 2 folds.")
    if not (bundle_dir / OOF_FILE).is_file():
        raise TrainingError(f"{bundle_dir} holds no {OOF_FILE}: it was not made by covidscan cv.")
    outer = load_bundle(bundle_dir)
    if (outer.card.training or {}).get("refit"):
        raise TrainingError(f"{outer.card.name} is one refitted model (covidscan cv --refit), not its fold models: "
                            "run cv-nested on a fold ensemble (the same cv command without --refit).")
    config, options = recipe_from_card(outer.card, root)
    shipped_rows, classes = read_oof_csv(bundle_dir / OOF_FILE)
    folds = sorted({row.fold for row in shipped_rows})
    if outer_folds is not None and (len(set(outer_folds)) < 2 or not set(outer_folds) <= set(folds)):
        # Two at least: each outer fold's temperature is fitted on the others' predictions.
        raise TrainingError(f"The outer folds to run must be at least two of {folds}.")
    if {row.repeat for row in shipped_rows} != {0} or len(folds) != outer.card.ensemble_size:
        raise TrainingError("Nested cross-validation needs a single-repeat run whose members are its fold models.")
    members = [member.get("name", "") for member in (outer.card.training or {}).get("ensemble_of", [])]
    if [name.rsplit("-", 1)[-1] for name in members] != [f"f{fold}" for fold in folds]:
        raise TrainingError(f"The members of {outer.card.name} are not its fold models in fold order ({members}).")
    dataset = pooled_dataset(config)
    fold_of = {row.path: row.fold for row in shipped_rows}
    keys = [dataset.item_key(item) for item in dataset.items]
    if set(keys) != set(fold_of):
        raise TrainingError(f"The images under {config.root} are not the ones the bundle was cross-validated on.")
    out_dir.mkdir(parents=True, exist_ok=True)
    inner_options = dataclasses.replace(options, folds=inner_folds)
    device = resolve_device(config.device)
    rows = {"ensemble": [], "single": []}
    sizes = {}
    with sigterm_stops(stop_event or threading.Event()) as stop:
        for fold in folds if outer_folds is None else sorted(set(outer_folds)):
            split_file = write_split_file(out_dir / "splits" / f"outer-f{fold}.json", dataset,
                                          [HOLDOUT if fold_of[key] == fold else "train" for key in keys])
            inner_config = copy.deepcopy(config)
            inner_config.dataset_options = {**config.dataset_options, "split_file": str(split_file)}
            inner_config.train_split, inner_config.val_split = "train", "val"
            inner_config.name = f"{config.name or 'cv'}-outer-f{fold}"
            inner_dir = out_dir / f"outer-f{fold}"
            if not _finished(inner_dir, inner_config, inner_options):
                if cross_validate(inner_config, inner_options, inner_dir, stop_event=stop).state != "succeeded":
                    return None
            inner = load_bundle(inner_dir / "model", device=device)
            sizes[fold] = inner.card.input_size
            held = {row.path: row for row in shipped_rows if row.fold == fold}
            models = {"ensemble": inner.model, "single": outer.model.members[fold]}
            for name, fold_rows in _score(models, inner.card, inner_config, held, fold, device).items():
                rows[name] += fold_rows
    return _compare(out_dir, rows, classes, outer.card, options, inner_folds, sizes)


def _finished(inner_dir: Path, config, options: CVOptions) -> bool:
    """Whether ``inner_dir`` holds a finished inner cross-validation of exactly this recipe (a rerun resumes)."""
    try:
        progress = json.loads((inner_dir / "progress.json").read_text())
        record = json.loads((inner_dir / "cv.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps({"options": dataclasses.asdict(options), "train_config": dataclasses.asdict(config)},
                                   default=str))
    same = all(record.get(key) == value for key, value in wanted.items())
    return same and progress.get("state") == "succeeded" and (inner_dir / "model" / "card.json").is_file()


def _score(models: dict, card, config, held: dict[str, OOFRow], fold: int, device) -> dict[str, list[OOFRow]]:
    """OOF rows of the outer holdout scored by each of ``models`` at the card's input size (decoded once)."""
    from covidscan.datasets import load_split_for
    from covidscan.evaluation import predict_logits

    data, y_true, images = load_split_for(card, config.dataset, config.root, HOLDOUT, config.dataset_options)
    keys = [data.item_key(item) for item in data.items]
    scored = {}
    for name, model in models.items():
        logits = predict_logits(model.to(device), images, card.mean, card.std, device).numpy()
        scored[name] = [OOFRow(held[key].path, held[key].group, int(label), 0, fold, [float(v) for v in row])
                        for key, label, row in zip(keys, y_true, logits)]
    return scored


def _compare(out_dir: Path, rows: dict[str, list[OOFRow]], classes: list[str], card, options: CVOptions,
             inner_folds: int, sizes: dict[int, int]) -> dict:
    from covidscan.oof import cross_fitted_probabilities, per_image

    record = {"bundle": card.name, "inner_folds": inner_folds, "outer_folds": sorted(sizes),
              "input_size_per_outer_fold": {f"f{k}": v for k, v in sizes.items()}, "estimates": {}}
    probs = {}
    for name, name_rows in rows.items():
        (out_dir / f"oof-{name}.csv").write_text(oof_csv(name_rows, classes))
        protocol = (f"nested cross-validation: the images of the bundle's outer folds {sorted(sizes)}, each fold scored by "
                    + (f"an ensemble of {inner_folds} inner fold models" if name == "ensemble" else
                       "the one model trained on all the other outer folds")
                    + "; temperature cross-fitted over the outer folds; group bootstrap")
        record["estimates"][name] = oof_estimate(name_rows, classes, card.positive_class, protocol,
                                                 options.bootstrap, options.seed)
        paths, labels, probs[name], groups = per_image(name_rows, cross_fitted_probabilities(name_rows))
        order = np.argsort(paths)
        probs[name], labels, groups = probs[name][order], labels[order], [groups[i] for i in order]
    record["ensemble_minus_single"] = paired_differences(labels, probs["ensemble"], probs["single"], groups, classes,
                                                         card.positive_class, options.bootstrap, options.seed)
    atomic_write_text(out_dir / NESTED_FILE, json.dumps(record, indent=2))
    return record
