"""Would mirror-image test-time augmentation help a fold ensemble? Measured on its held-out images.

A cross-validated bundle stores which fold model never saw each image (its ``oof.csv``).
:func:`mirror_check` rescores every held-out image with that very member, once as it is and once
averaged with its left-right mirror (as ``covidscan evaluate --tta`` does), both at the bundle's
input size, and compares the two out-of-fold estimates pairwise (:func:`covidscan.oof.compare_oof`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from covidscan.errors import TrainingError
from covidscan.estimate import DEFAULT_BOOTSTRAP
from covidscan.oof import OOF_FILE, OOFRow, compare_oof, oof_csv, read_oof_csv

PLAIN_FILE, MIRRORED_FILE = "oof-plain.csv", "oof-mirrored.csv"
_FOLD_RUN = re.compile(r"r(\d+)-f(\d+)$")


def mirror_check(bundle_dir: str | os.PathLike, root: str | os.PathLike, out: str | os.PathLike,
                 samples: int = DEFAULT_BOOTSTRAP, device: str = "cpu") -> dict:
    """Mirror-averaged against plain predictions of a fold ensemble's held-out images, paired.

    Args:
        bundle_dir: a fold ensemble written by ``covidscan cv`` or ``cv-join`` (with its ``oof.csv``).
        root: the dataset folder it was cross-validated on (``oof.csv`` paths are relative to it).
        out: a folder for the two rescored prediction files (:data:`PLAIN_FILE`, :data:`MIRRORED_FILE`),
            which ``covidscan cv-compare`` reads as well.
        samples: bootstrap resamples.
        device: where the members run.

    Returns:
        :func:`covidscan.oof.compare_oof` of the mirrored (``a``) against the plain (``b``) predictions.

    Raises:
        TrainingError: not a fold ensemble with out-of-fold predictions, images missing under ``root``,
            or an unwritable ``out``.
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
    members = _held_out_by(card, rows)
    # Each image once, though every partition (or joined run) holds it out again.
    paths = list(dict.fromkeys(row.path for row in rows))
    try:
        decoded = load_images([root / path for path in paths], card.input_size, card.dicom_window, crop=card.crop)
    except DatasetError as exc:
        raise TrainingError(f"Cannot read the model's held-out images under {root} ({exc}). Give the dataset folder "
                            "the model was cross-validated on.") from None
    image_of = {path: i for i, path in enumerate(paths)}

    plain = np.zeros((len(rows), len(classes)))
    flipped = np.zeros_like(plain)
    for member in sorted(set(members)):
        index = [i for i, m in enumerate(members) if m == member]
        images = decoded[[image_of[rows[i].path] for i in index]]
        network = bundle.model.members[member]
        plain[index] = predict_logits(network, images, card.mean, card.std, device).numpy()
        flipped[index] = predict_logits(network, torch.flip(images, dims=[3]), card.mean, card.std, device).numpy()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, logits in ((PLAIN_FILE, plain), (MIRRORED_FILE, (plain + flipped) / 2)):
            rescored = [OOFRow(r.path, r.group, r.label_index, r.repeat, r.fold, [float(v) for v in logits[i]])
                        for i, r in enumerate(rows)]
            (out / name).write_text(oof_csv(rescored, classes))
    except OSError as exc:
        raise TrainingError(f"Cannot write to {out}: {exc.strerror or exc}.") from None
    return compare_oof(out / MIRRORED_FILE, out / PLAIN_FILE, samples=samples)


def _held_out_by(card, rows) -> list[int]:
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
                lookup[(int(found[1]) * len(runs) + j, int(found[2]))] = member
            member += 1
    if member < 2 or member != card.ensemble_size:
        raise TrainingError("This model is not an ensemble of fold models (cv or cv-join); a refit or single model "
                            "has no held-out images to rescore.")
    missing = sorted({(row.repeat, row.fold) for row in rows} - set(lookup))
    if missing:
        raise TrainingError(f"No member of this model held out repeat {missing[0][0]}, fold {missing[0][1]} of its "
                            f"{OOF_FILE}: its predictions and members do not match.")
    return [lookup[(row.repeat, row.fold)] for row in rows]
