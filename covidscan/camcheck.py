"""Dataset-level shortcut check: does a CT model look inside the lungs across a whole split?

Many COVID-CT slices are figures cut from papers, with arrows, circles and captions; a model can
learn those instead of the lungs and still score well. This check explains every slice of a split
with one CAM method and reports the mean share of the map inside the automatic lung mask
(:mod:`covidscan.lungs`) and the slices whose maps sit mostly outside the lungs. Used by
``covidscan evaluate --cam-check`` and the Train page's run report.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from covidscan.lungs import OUTSIDE_LUNGS_THRESHOLD


def cam_check(
    model: str | os.PathLike,
    dataset: str,
    root: str | os.PathLike,
    split: str = "val",
    method: str = "gradcam",
    limit: int | None = None,
    device: str = "cpu",
    dataset_options: dict | None = None,
    predictor=None,
) -> dict[str, Any]:
    """The share of each slice's CAM inside its lungs, over one split.

    Args:
        model: the bundle's path (or pass a loaded ``predictor``).
        dataset, root, split, dataset_options: which images (:func:`covidscan.datasets.open_dataset`).
        method: the CAM method (:data:`covidscan.cams.CAM_METHODS`).
        limit: explain only the first ``limit`` slices (None: all).
        device: ``cpu``, ``cuda`` or ``auto``.
        predictor: an already loaded :class:`~covidscan.predictor.Predictor` of ``model``.

    Returns:
        ``{"method", "n", "n_with_mask", "mean_in_lungs", "median_in_lungs", "threshold", "outside",
        "seconds_per_image", "note"}``; ``outside`` lists the slices under the threshold (file, path,
        share, true and predicted class), lowest share first. X-ray models get ``n`` 0 and a note.
    """
    from covidscan.cams import cam_method
    from covidscan.datasets import open_dataset
    from covidscan.predictor import Predictor

    cam_method(method)  # an unknown method fails before any image is read
    predictor = predictor or Predictor(model, device=device)
    result: dict[str, Any] = {"method": method, "n": 0, "n_with_mask": 0, "mean_in_lungs": None,
                              "median_in_lungs": None, "threshold": OUTSIDE_LUNGS_THRESHOLD, "outside": [],
                              "seconds_per_image": None, "note": None}
    if predictor.card.modality != "CT":
        result["note"] = ("No lung mask for X-rays: no sound offline lung segmenter for projections, "
                          "so the share inside the lungs is not measured.")
        return result
    data = open_dataset(dataset, root, split=split, **(dataset_options or {}))
    items = list(data.items)[:limit] if limit else list(data.items)
    window = predictor.card.window
    shares: list[float] = []
    started = time.perf_counter()
    for item in items:
        image = predictor.load(str(item.path), window=window)
        prediction, explanation = predictor.explain(image, method=method)
        if explanation.in_lungs is None:
            continue
        shares.append(explanation.in_lungs)
        if explanation.in_lungs < OUTSIDE_LUNGS_THRESHOLD:
            result["outside"].append({"file": Path(item.path).name, "path": str(item.path),
                                      "in_lungs": round(float(explanation.in_lungs), 4),
                                      "true": data.classes[item.label], "predicted": prediction.label})
    result["n"] = len(items)
    result["n_with_mask"] = len(shares)
    if shares:
        result["mean_in_lungs"] = float(np.mean(shares))
        result["median_in_lungs"] = float(np.median(shares))
    if items:
        result["seconds_per_image"] = round((time.perf_counter() - started) / len(items), 3)
    if len(shares) < len(items):
        result["note"] = f"{len(items) - len(shares)} slice(s) had no lung mask and are not counted."
    result["outside"].sort(key=lambda row: row["in_lungs"])
    return result


def outside_overlays(predictor, check: dict[str, Any], limit: int = 12, max_side: int = 320,
                     colormap: str = "jet") -> list[tuple[str, np.ndarray]]:
    """Overlays (with the lung outline) of the slices a :func:`cam_check` found looking outside the lungs.

    Returns:
        (caption, RGB uint8 overlay shrunk to ``max_side``) for the first ``limit`` such slices.
    """
    import cv2

    pictures = []
    for row in check.get("outside", [])[:limit]:
        image = predictor.load(row["path"], window=predictor.card.window)
        _, explanation = predictor.explain(image, method=check["method"], colormap=colormap, lung_outline=True)
        overlay = explanation.overlay
        scale = min(1.0, max_side / max(overlay.shape[:2]))
        if scale < 1.0:
            overlay = cv2.resize(overlay, (round(overlay.shape[1] * scale), round(overlay.shape[0] * scale)),
                                 interpolation=cv2.INTER_AREA)
        pictures.append((f"{row['file']}: {row['in_lungs']:.0%} inside", overlay))
    return pictures


def run_cam_check(run_dir: str | os.PathLike, method: str = "gradcam", limit: int | None = None,
                  device: str = "cpu") -> tuple[dict[str, Any], Any]:
    """:func:`cam_check` of a training run's model on the validation split it was trained against.

    Args:
        run_dir: the run directory (``model/`` and ``config.json``).

    Returns:
        The check and the loaded :class:`~covidscan.predictor.Predictor` (for :func:`outside_overlays`).

    Raises:
        CovidscanError: the run has no model, or its configuration names no dataset.
    """
    from covidscan.errors import CovidscanError
    from covidscan.predictor import Predictor
    from covidscan.runs import run_config

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "card.json").is_file():
        raise CovidscanError("This run has no saved model (it did not finish an epoch).")
    config = run_config(run_dir)
    dataset, root = config.get("dataset"), config.get("root")
    if not dataset or not root:
        raise CovidscanError("The run's configuration does not say which dataset it used.")
    predictor = Predictor(run_dir / "model", device=device)
    check = cam_check(run_dir / "model", dataset, root, config.get("val_split") or "val", method=method,
                      limit=limit, dataset_options=config.get("dataset_options") or {}, predictor=predictor)
    return check, predictor
