"""Several cross-validation runs' fold models shipped as one ensemble, measured out of fold.

``covidscan cv`` ships one run's fold models. Runs of other recipes over the same pooled images and
folds (another learning rate or seed of the same architecture) err differently, and
:func:`covidscan.oof.average_oof` measures all their fold models together: each image scored by the
fold model of each run that never saw it. :func:`join_runs` ships that ensemble as one bundle: every
run's fold models with their logits averaged, at one inference size, the joined estimate in its card
and its ``oof.csv`` beside it, and an input gate fitted out of fold over all the members.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from covidscan.errors import TrainingError
from covidscan.oof import (OOF_FILE, average_oof, cross_fitted_probabilities, estimate_of_stored, oof_csv,
                           per_image)

if TYPE_CHECKING:
    from covidscan.bundle import ModelCard

# What every joined run must share besides its images: how an image is prepared and what the outputs mean.
_SAME_DATA = ("dataset", "modality", "window", "crop", "positive_class")


def join_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, name: str | None = None,
              description: str = "", command: str = "", device: str = "cpu") -> dict:
    """Write the fold models of several ``covidscan cv`` runs over the same images as one ensemble bundle.

    The estimate is :func:`~covidscan.oof.average_oof` of the runs' ``oof.csv`` (each run's own
    cross-fitted sizes and temperatures). The shipped inference size is, among the sizes every run
    scored out of fold (``oof-<size>px.csv``), the one whose joined out-of-fold AUC is highest, as
    ``cv`` chooses it for one run; the temperature is fitted on the runs' out-of-fold logits at that
    size averaged per image. The input gate is fitted out of fold over every member.

    Args:
        runs: two or more finished ``covidscan cv`` folders (``cv.json``, ``oof.csv``, fold runs).
        out: the bundle folder to write.
        name, description: the bundle's (default: the first run's name, and a sentence naming the runs).
        command: recorded in the card.
        device: where the members compute the gate's features.

    Returns:
        The joined estimate (as in the card's ``metrics.estimate``).

    Raises:
        TrainingError: fewer than two runs, an unfinished run, runs over other numbers of fold
            partitions, or runs over other images, labels, classes, preparation or architectures.
    """
    from covidscan.cv_gate import fit_fold_gate, fold_runs
    from covidscan.ensemble import build_ensemble
    from covidscan.errors import ModelBundleError
    from covidscan.evaluation import fit_temperature

    runs = [Path(run) for run in runs]
    if len(runs) < 2:
        raise TrainingError("Give at least two cross-validation runs to join.")
    records = [_read_run(run) for run in runs]
    first = records[0]
    for record in records[1:]:
        different = [key for key in _SAME_DATA if record.train_config.get(key) != first.train_config.get(key)]
        if different:
            raise TrainingError(f"{record.path} cannot join {first.path}: their recipes differ in "
                                f"{', '.join(different)}.")
    repeats = {_repeats(record) for record in records}
    if len(repeats) > 1:
        raise TrainingError("The runs were cross-validated over different numbers of fold partitions "
                            f"(--repeats {', '.join(map(str, sorted(repeats)))}): join runs with the same --repeats.")
    rows, classes = average_oof(runs)  # refuses runs over other images, labels or classes
    text = oof_csv(rows, classes)
    size, size_choice, at_size = _shipped_size(records)
    card = first.card
    protocol = _protocol(records, size, size_choice)
    options = first.options
    result, rows, _ = estimate_of_stored(text, card.positive_class, protocol, options.get("bootstrap", 1000),
                                         options.get("seed", 0))
    temperature = fit_temperature(*_mean_logits_per_image(at_size or rows))
    result["runs"] = len(runs)  # per_repeat holds each run alone (see covidscan.oof.average_oof's numbering)
    members = [(run, fold) for run in runs for fold in fold_runs(run)]
    out = Path(out)
    config = first.train_config
    # Runs may differ in their training seed (the same recipe rerun on the same folds): each records its own.
    joined = [{"run": record.path.name, "command": record.train_config.get("command", ""),
               "training_seed": record.train_config.get("seed"),
               "folds": [fold for cv_dir, fold in members if cv_dir == record.path],
               **_sizes_per_fold(record),
               **{key: record.estimate[key] for key in ("auc", "accuracy", "macro_f1") if key in record.estimate}}
              for record in records]
    training_record = {
        "cross_validation": {**options, "protocol": protocol, "joined_runs": joined,
                             **({"input_size_choice": size_choice} if size_choice else {})},
        "dataset": config["dataset"],
        "data": {"root": Path(config["root"]).name, "pooled_splits": [config["train_split"], config["val_split"]],
                 "options": {k: v for k, v in config.get("dataset_options", {}).items() if k != "split_file"}}}
    try:
        build_ensemble(
            [cv_dir / fold / "model" for cv_dir, fold in members], out, name=name or card.name,
            weights_dtype=options.get("weights_dtype", "float16"),
            description=description or (f"{len(members)} cross-validation fold models of {card.architecture} from "
                                         f"{len(runs)} runs, logits averaged."),
            command=command or "covidscan cv-join (Python API)",
            card_overrides={"temperature": float(temperature), "threshold": None, "input_size": int(size),
                            "metrics": {"estimate": result}},
            training_record=training_record)
    except ModelBundleError as exc:
        raise TrainingError(f"The runs' fold models cannot form one ensemble: {exc}") from None
    (out / OOF_FILE).write_text(text)
    os.chmod(out / OOF_FILE, 0o644)
    fit_fold_gate(out, members, config, taps=options.get("gate_taps") or (),
                  combine=options.get("gate_combine", "max"), score_head=not options.get("gate_taps_only", False),
                  pass_rate=options.get("gate_pass_rate", 0.99), device=device,
                  measured_on=f"out-of-fold predictions (one fold model of each of the {len(runs)} runs"
                              + (" per fold partition" if repeats != {1} else "") + ", cross-fitted temperatures)")
    return result


@dataclass(frozen=True)
class _Run:
    """A finished cross-validation folder: its cv.json's options and training config, and its model's card."""

    path: Path
    options: dict
    train_config: dict
    card: "ModelCard"

    @property
    def estimate(self) -> dict:
        return self.card.metrics["estimate"]


def _sizes_per_fold(record: _Run) -> dict:
    """The size each of the run's held-out folds was scored at in its estimate (cross-fitted), for
    ``covidscan cv-rescore``; empty when the run chose no size."""
    choice = (record.card.training.get("cross_validation") or {}).get("input_size_choice") or {}
    return {"input_size_per_fold": choice["per_fold"]} if choice.get("per_fold") else {}


def _repeats(record: _Run) -> int:
    """How many fold partitions the run cross-validated over (``cv --repeats``)."""
    return int(record.options.get("repeats") or 1)


def _read_run(run: Path) -> _Run:
    """A finished cross-validation folder with fold models (its cv.json, card, estimate and oof.csv checked)."""
    from covidscan.bundle import read_card
    from covidscan.errors import ModelBundleError

    try:
        record = json.loads((run / "cv.json").read_text())
        card = read_card(run / "model")
        if "estimate" not in card.metrics:
            raise ValueError("no cross-validated estimate in its model's card")
        if not (run / OOF_FILE).is_file():
            raise OSError(f"no {OOF_FILE}")
        if record["options"].get("refit"):
            raise ValueError("a refitted model, not fold models")
        return _Run(run, record["options"], record["train_config"], card)
    except (OSError, ValueError, KeyError, TypeError, ModelBundleError) as exc:
        raise TrainingError(f"{run} is not a finished covidscan cv folder with fold models ({exc}).") from None


def _shipped_size(records: Sequence[_Run]) -> tuple[int, dict | None, list | None]:
    """The joined ensemble's inference size, the record of its choice and the runs' OOF rows at that size
    averaged (both None: nothing to choose, the models' own size).

    Candidates are the sizes every run scored out of fold; the joined AUC (each image's calibrated
    probabilities averaged over the runs) ranks them, ties going to the smaller size.
    """
    from covidscan.evaluation import compute_metrics

    candidates = sorted(set.intersection(*[{int(s) for s in record.options.get("eval_sizes") or []
                                            if (record.path / f"oof-{int(s)}px.csv").is_file()}
                                           for record in records]))
    if len(candidates) < 2:
        sizes = {record.card.input_size for record in records}
        if len(sizes) > 1:
            raise TrainingError(f"The runs' models take different input sizes ({', '.join(map(str, sorted(sizes)))} px) "
                                "and no common size was scored out of fold: run cv with the same --eval-size options.")
        return sizes.pop(), None, None
    scores, rows_at = {}, {}
    for size in candidates:
        rows_at[size], classes = average_oof([record.path / f"oof-{size}px.csv" for record in records])
        _, labels, probs, _ = per_image(rows_at[size], cross_fitted_probabilities(rows_at[size]))
        auc = compute_metrics(labels, probs, classes)["auc"]
        scores[size] = float("nan") if auc is None else float(auc)
    shipped = max(candidates, key=lambda size: (np.nan_to_num(scores[size], nan=-1.0), -size))
    choice = {"candidates": candidates, "shipped": shipped, "oof_score": {str(s): scores[s] for s in candidates},
              "score": "AUC of the runs' out-of-fold probabilities averaged per image (macro one-vs-rest for "
                       "more than two classes)"}
    return shipped, choice, rows_at[shipped]


def _mean_logits_per_image(rows) -> tuple:
    """Each image's out-of-fold logits averaged over the runs (and repeats) that held it out: what the
    ensemble's logit average sees, for fitting its temperature."""
    import torch

    by_path: dict[str, list] = {}
    for row in rows:
        by_path.setdefault(row.path, []).append(row)
    logits = torch.tensor(np.array([np.mean([r.logits for r in group], axis=0) for group in by_path.values()]),
                          dtype=torch.float32)
    return logits, [group[0].label_index for group in by_path.values()]


def _protocol(records: Sequence[_Run], size: int, size_choice: dict | None) -> str:
    from covidscan.cv import fold_ensemble_sentence

    sizing = (f"; the shipped size, {size} px, is the one of {'/'.join(map(str, size_choice['candidates']))} px "
              "with the best joined out-of-fold AUC" if size_choice else "")
    runs, repeats = len(records), _repeats(records[0])  # join_runs checked that every run has as many
    count = runs * repeats
    each_run = records[0].estimate.get("protocol", "").replace(fold_ensemble_sentence(repeats), "").strip()
    held_out_by = "one per run" if repeats == 1 else f"one per run and fold partition, {repeats} partitions each"
    return (f"{runs} cross-validation runs over the same images joined: each image's calibrated probabilities "
            f"averaged over the {count} fold models ({held_out_by}) that never saw it{sizing}. Each run: {each_run} "
            f"Figures are for {count} fold models per image; the shipped ensemble averages all the runs' fold models.")
