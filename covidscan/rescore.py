"""A fold ensemble's held-out images rescored by its stored members, and its estimate restated from them.

A cross-validated bundle stores which fold model never saw each image (its ``oof.csv``), and each of
those fold models is one of its members. :func:`held_out_logits` rescores every held-out image with
that very member as the bundle stores it, at the bundle's input size. :func:`restate_estimate` puts
those logits in place of the bundle's ``oof.csv`` and restates its card's estimate from them, so the
figures are exactly those of the stored weights. ``covidscan cv`` scores its folds that way since
this module exists; bundles written before it scored them with the unrounded fold models, which
differ from float16-stored members by the rounding.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from covidscan.errors import TrainingError
from covidscan.oof import OOF_FILE, OOFRow, estimate_of_stored, joined_repeat, oof_csv, read_oof_csv, row_key
from covidscan.utils import atomic_write_text

_FOLD_RUN = re.compile(r"r(\d+)-f(\d+)$")

# Appended to a restated estimate's protocol (once).
RESTATED_SENTENCE = ("Restated from the stored weights (covidscan cv-rescore): each held-out image rescored by the "
                     "shipped member that never saw it, as the bundle stores it.")


@dataclass
class HeldOut:
    """A fold ensemble's out-of-fold rows and its stored members' logits for them, row for row."""

    rows: list[OOFRow]
    classes: list[str]
    plain: np.ndarray
    mirrored: np.ndarray | None  # each row's image and its left-right mirror averaged; None unless asked


def held_out_logits(bundle_dir: str | os.PathLike, root: str | os.PathLike, device: str = "cpu",
                    mirrored: bool = False, sizes: Mapping[tuple[int, int], int] | None = None) -> HeldOut:
    """Rescore each held-out image of a fold ensemble with the stored member that never saw it.

    Args:
        bundle_dir: a fold ensemble written by ``covidscan cv`` or ``cv-join`` (with its ``oof.csv``).
        root: the dataset folder it was cross-validated on (``oof.csv`` paths are relative to it).
        device: where the members run.
        mirrored: also score each image averaged with its left-right mirror (as ``evaluate --tta``).
        sizes: the inference size (px) of each ``(repeat, fold)`` of ``oof.csv``; default: the
            bundle's input size for all.

    Returns:
        The bundle's ``oof.csv`` rows and, in their order, the members' logits at those sizes.

    Raises:
        TrainingError: not a fold ensemble with out-of-fold predictions, or images missing under ``root``.
    """
    import torch

    from covidscan.bundle import load_bundle
    from covidscan.datasets import load_images
    from covidscan.errors import CovidscanError, DatasetError
    from covidscan.evaluation import predict_logits

    bundle_dir, root = Path(bundle_dir), Path(root)
    if not (bundle_dir / OOF_FILE).is_file():
        raise TrainingError(f"{bundle_dir} holds no out-of-fold predictions ({OOF_FILE}): give a model written by "
                            "covidscan cv or cv-join.")
    rows, classes = read_oof_csv(bundle_dir / OOF_FILE)
    try:
        bundle = load_bundle(bundle_dir, device=device)
    except CovidscanError as exc:
        raise TrainingError(f"Cannot load {bundle_dir}: {exc}") from None
    card = bundle.card
    if list(card.classes) != list(classes):
        raise TrainingError(f"{bundle_dir}'s {OOF_FILE} is not of its model's classes.")
    members = held_out_by(card, rows)
    size_of = [int((sizes or {}).get((row.repeat, row.fold), card.input_size)) for row in rows]
    plain = np.zeros((len(rows), len(classes)))
    flipped = np.zeros_like(plain) if mirrored else None
    for size in sorted(set(size_of)):
        # Each image once per size, though every partition (or joined run) holds it out again.
        paths = list(dict.fromkeys(row.path for row, at in zip(rows, size_of) if at == size))
        try:
            decoded = load_images([root / path for path in paths], size, card.dicom_window, crop=card.crop)
        except DatasetError as exc:
            raise TrainingError(f"Cannot read the model's held-out images under {root} ({exc}). Give the dataset "
                                "folder the model was cross-validated on.") from None
        image_of = {path: i for i, path in enumerate(paths)}
        for member in sorted(set(members)):
            index = [i for i, (m, at) in enumerate(zip(members, size_of)) if m == member and at == size]
            if not index:
                continue
            images = decoded[[image_of[rows[i].path] for i in index]]
            network = bundle.model.members[member]
            plain[index] = predict_logits(network, images, card.mean, card.std, device).numpy()
            if flipped is not None:
                flipped[index] = predict_logits(network, torch.flip(images, dims=[3]), card.mean, card.std,
                                                device).numpy()
    return HeldOut(rows, list(classes), plain, None if flipped is None else (plain + flipped) / 2)


def with_logits(rows: list[OOFRow], logits: np.ndarray) -> list[OOFRow]:
    """The rows with their logits replaced, row for row."""
    return [OOFRow(r.path, r.group, r.label_index, r.repeat, r.fold, [float(v) for v in logits[i]])
            for i, r in enumerate(rows)]


def fold_sizes(card) -> dict[tuple[int, int], int] | None:
    """The inference size each ``(repeat, fold)`` of a fold ensemble's ``oof.csv`` was scored at.

    One size when cross-validation chose none; a ``cv`` card's cross-fitted ``per_fold`` sizes; a
    ``cv-join`` card's per joined run (run j's repeat r is ``oof.csv`` repeat r * J + j). None when
    the card chose sizes per fold but does not record them (joins written before they did).
    """
    cv = (card.training or {}).get("cross_validation") or {}
    joined = cv.get("joined_runs")
    if not cv.get("input_size_choice"):
        return {}  # every fold at the card's input size
    if not joined:
        return {_fold_key(name): int(size) for name, size in cv["input_size_choice"].get("per_fold", {}).items()} or None
    sizes = {}
    for j, run in enumerate(joined):
        if not run.get("input_size_per_fold"):
            return None
        for name, size in run["input_size_per_fold"].items():
            repeat, fold = _fold_key(name)
            sizes[(joined_repeat(repeat, j, len(joined)), fold)] = int(size)
    return sizes


def _fold_key(name: str) -> tuple[int, int]:
    found = _FOLD_RUN.search(str(name))
    if not found:
        raise TrainingError(f"'{name}' names no fold run (r<repeat>-f<fold>).")
    return int(found[1]), int(found[2])


def parse_fold_sizes(values: Sequence[str]) -> dict[tuple[int, int], int]:
    """``["r0-f1=288", ...]`` (repeat and fold as in ``oof.csv``) as ``{(0, 1): 288, ...}``."""
    sizes = {}
    for value in values:
        name, _, size = value.partition("=")
        if not size.strip().isdigit():
            raise TrainingError(f"'{value}' is not r<repeat>-f<fold>=<px>, e.g. r0-f1=288.")
        sizes[_fold_key(name.strip())] = int(size)
    return sizes


def restate_estimate(bundle_dir: str | os.PathLike, root: str | os.PathLike, device: str = "cpu",
                     sizes: Mapping[tuple[int, int], int] | None = None) -> dict:
    """Restate a fold ensemble's out-of-fold estimate from its stored members.

    Rewrites the bundle's ``oof.csv`` with its members' own logits (:func:`held_out_logits`, each
    fold at the size it was scored at) and its card's ``metrics.estimate`` from them, with the
    protocol, bootstrap and seed it had. A ``metrics.repeated_estimate`` is restated too: its rows of
    the bundle's own fold partitions take the rescored logits, the other partitions' (models not
    shipped) stay as they were scored, and the gate's out-of-fold uncertainty summary is remade from
    the new rows. The weights, temperature and gate's threshold are untouched; the card records the
    sizes used and how far the logits moved. Running it again changes nothing.

    Args:
        bundle_dir: a fold ensemble written by ``covidscan cv`` or ``cv-join``.
        root: the dataset folder it was cross-validated on.
        device: where the members run.
        sizes: each ``(repeat, fold)``'s inference size, for cards that do not record them
            (:func:`fold_sizes`); sizes the card records win over none, given ones over the card's.

    Returns:
        ``{"before": old estimate, "after": new estimate, "max_logit_change": float, "sizes": {...}}``
        (and ``"repeated_before"``/``"repeated_after"`` when the card has a repeated estimate).

    Raises:
        TrainingError: see :func:`held_out_logits`; a card without an estimate, or without the
            folds' sizes where none were given.
    """
    from covidscan.bundle import CARD_FILE, read_card
    from covidscan.repeats import REPEATS_FILE

    bundle_dir = Path(bundle_dir)
    card = read_card(bundle_dir)
    before = (card.metrics or {}).get("estimate")
    if not before:
        raise TrainingError(f"{bundle_dir} has no cross-validated estimate to restate.")
    recorded = fold_sizes(card)
    if recorded is None and not sizes:
        raise TrainingError(f"{bundle_dir}'s card chose an inference size per fold but does not record them: give "
                            "each fold's size (--fold-size r<repeat>-f<fold>=<px>, repeats numbered as in its "
                            f"{OOF_FILE}).")
    sizes = {**(recorded or {}), **(sizes or {})}
    held = held_out_logits(bundle_dir, root, device, sizes=sizes)
    rows = with_logits(held.rows, held.plain)
    change = float(np.abs(held.plain - np.array([row.logits for row in held.rows])).max())
    after = _estimate(rows, held.classes, card.positive_class, before, OOF_FILE)
    used = {f"r{r}-f{f}": sizes.get((r, f), card.input_size) for r, f in sorted({(x.repeat, x.fold) for x in rows})}
    result = {"before": before, "after": after, "max_logit_change": change, "sizes": used}
    writes = {OOF_FILE: oof_csv(rows, held.classes)}
    data = json.loads((bundle_dir / CARD_FILE).read_text())
    data["metrics"]["estimate"] = after
    uncertainty = (data.get("gate") or {}).get("uncertainty")
    if uncertainty and "selective" in uncertainty:  # the gate's out-of-fold accuracy-by-certainty, from the new rows
        from covidscan.cv_gate import oof_uncertainty

        data["gate"]["uncertainty"] = oof_uncertainty(rows, uncertainty.get("measured_on", "out-of-fold predictions"))
    cv = data["training"].setdefault("cross_validation", {})
    if change > 1e-6 or "restated_from_stored_weights" not in cv:  # a repeat leaves the first record
        cv["restated_from_stored_weights"] = {"input_size_per_fold": used, "max_logit_change": change}
    repeated = data["metrics"].get("repeated_estimate")
    if repeated and (bundle_dir / REPEATS_FILE).is_file():
        repeat_rows, repeat_classes = read_oof_csv(bundle_dir / REPEATS_FILE)
        rescored = {row_key(old): new for old, new in zip(held.rows, rows)}
        if not set(rescored) <= {row_key(row) for row in repeat_rows} or repeat_classes != held.classes:
            raise TrainingError(f"{bundle_dir}'s {REPEATS_FILE} does not hold its own fold partitions' rows: "
                                "its repeated estimate cannot be restated.")
        repeat_rows = [rescored.get(row_key(row), row) for row in repeat_rows]
        result["repeated_before"] = repeated
        result["repeated_after"] = data["metrics"]["repeated_estimate"] = _estimate(
            repeat_rows, held.classes, card.positive_class, repeated, REPEATS_FILE)
        writes[REPEATS_FILE] = oof_csv(repeat_rows, held.classes)
    for name, text in writes.items():
        atomic_write_text(bundle_dir / name, text)
    atomic_write_text(bundle_dir / CARD_FILE, json.dumps(data, indent=2) + "\n")
    return result


def _estimate(rows: list[OOFRow], classes: list[str], positive_class: str | None, stored: dict, file: str) -> dict:
    """``stored``'s estimate remade from ``rows`` (as written to ``file``), its protocol marked as restated."""
    protocol = stored["protocol"]
    if RESTATED_SENTENCE not in protocol:
        protocol = f"{protocol} {RESTATED_SENTENCE}"
    result, _, _ = estimate_of_stored(oof_csv(rows, classes), positive_class, protocol, stored["bootstrap"]["samples"],
                                      stored["bootstrap"]["seed"], file)
    if "runs" in stored:
        result["runs"] = stored["runs"]
    return result


def held_out_by(card, rows) -> list[int]:
    """For each OOF row, the index of the ensemble member that held its image out.

    A ``cv`` bundle's members are its fold runs ``r<repeat>-f<fold>`` in order; a ``cv-join`` bundle's
    are each joined run's fold runs in turn, and of J runs, run j's repeat r is OOF repeat r * J + j
    (:func:`covidscan.oof.average_oof`).
    """
    cv = (card.training or {}).get("cross_validation") or {}
    joined = cv.get("joined_runs")
    if joined:
        runs = [run.get("folds", []) for run in joined]
    else:
        runs = [[member.get("name", "") for member in (card.training or {}).get("ensemble_of") or []]]
    lookup: dict[tuple[int, int], int] = {}
    member = 0
    for j, names in enumerate(runs):
        for name in names:
            found = _FOLD_RUN.search(str(name))
            if found:
                lookup[(joined_repeat(int(found[1]), j, len(runs)), int(found[2]))] = member
            member += 1
    if member < 2 or member != card.ensemble_size:
        raise TrainingError("This model is not an ensemble of fold models (cv or cv-join); a refit or single model "
                            "has no held-out images to rescore.")
    missing = sorted({(row.repeat, row.fold) for row in rows} - set(lookup))
    if missing:
        raise TrainingError(f"No member of this model held out repeat {missing[0][0]}, fold {missing[0][1]} of its "
                            f"{OOF_FILE}: its predictions and members do not match.")
    return [lookup[(row.repeat, row.fold)] for row in rows]
