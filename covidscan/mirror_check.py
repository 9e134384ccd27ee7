"""Would mirror-image test-time augmentation help a fold ensemble? Measured on its held-out images.

A cross-validated bundle stores which fold model never saw each image (its ``oof.csv``).
:func:`mirror_check` rescores every held-out image with that very member, once as it is and once
averaged with its left-right mirror (as ``covidscan evaluate --tta`` does), both at the bundle's
input size, and compares the two out-of-fold estimates pairwise (:func:`covidscan.oof.compare_oof`).
"""
from __future__ import annotations

import os
from pathlib import Path

from covidscan.errors import TrainingError
from covidscan.estimate import DEFAULT_BOOTSTRAP
from covidscan.oof import compare_oof, oof_csv
from covidscan.rescore import held_out_logits, with_logits

PLAIN_FILE, MIRRORED_FILE = "oof-plain.csv", "oof-mirrored.csv"


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
    held = held_out_logits(bundle_dir, root, device, mirrored=True)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, logits in ((PLAIN_FILE, held.plain), (MIRRORED_FILE, held.mirrored)):
            (out / name).write_text(oof_csv(with_logits(held.rows, logits), held.classes))
    except OSError as exc:
        raise TrainingError(f"Cannot write to {out}: {exc.strerror or exc}.") from None
    return compare_oof(out / MIRRORED_FILE, out / PLAIN_FILE, samples=samples)

