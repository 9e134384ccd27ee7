"""Image statistics for the dataset explorer: thumbnails, samples per class, intensity histograms.

Unreadable files never break a grid or a chart: they give a grey placeholder or are left out.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidscan.errors import CovidscanError
from covidscan.images import read_image


def load_pixels(path: str | Path) -> np.ndarray:
    """Read an image (any format covidscan reads, DICOM included) as uint8 RGB.

    Raises:
        ImageReadError: when the file cannot be read.
    """
    return read_image(Path(path)).pixels


def thumbnail(path: str | Path, size: int = 160) -> np.ndarray:
    """A small RGB copy of an image whose longer side is ``size`` pixels.

    Unreadable files give a grey placeholder rather than an error, so one bad file does not
    break a grid.
    """
    try:
        image = Image.fromarray(load_pixels(path))
    except CovidscanError:
        return np.full((size, size, 3), 128, dtype=np.uint8)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image)


def sample_per_class(meta: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """A seeded random sample of at most ``per_class`` rows of each class."""
    parts = [group.sample(min(len(group), per_class), random_state=seed)
             for _, group in meta.groupby("label", sort=True)]
    return pd.concat(parts).reset_index(drop=True) if parts else meta.iloc[0:0]


def image_histogram(path: str | Path, bins: int = 32) -> np.ndarray | None:
    """Grey-level histogram of one image over 0-255, as fractions of its pixels (None if unreadable)."""
    try:
        gray = load_pixels(path).mean(axis=2)
    except CovidscanError:
        return None
    counts, _ = np.histogram(gray, bins=np.linspace(0, 256, bins + 1))
    return counts / counts.sum()


def class_histograms(labels: Sequence[str], histograms: Sequence[np.ndarray | None]) -> pd.DataFrame:
    """Average per-image histograms by class.

    Returns:
        Long DataFrame with ``label``, ``intensity`` (bin centre, 0-255), ``fraction`` (of pixels)
        and ``images`` (how many readable images the class curve averages).
    """
    columns = ["label", "intensity", "fraction", "images"]
    readable = [(label, h) for label, h in zip(labels, histograms) if h is not None]
    if not readable:
        return pd.DataFrame(columns=columns)
    bins = len(readable[0][1])
    edges = np.linspace(0, 256, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    rows = []
    for label in sorted({label for label, _ in readable}):
        stack = np.stack([h for l, h in readable if l == label])
        rows.extend({"label": label, "intensity": float(c), "fraction": float(f), "images": len(stack)}
                    for c, f in zip(centres, stack.mean(axis=0)))
    return pd.DataFrame(rows, columns=columns)


def intensity_histograms(
    meta: pd.DataFrame,
    bins: int = 32,
    per_class: int = 100,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
) -> pd.DataFrame:
    """Mean grey-level histogram of each class, on a random sample of its images.

    Args:
        meta: metadata with ``path`` and ``label``.
        bins: number of intensity bins over 0-255.
        per_class: at most this many images per class are read (keeps big datasets fast).
        seed: sampling seed.
        progress: called with the fraction done (0-1) after each image.

    Returns:
        See :func:`class_histograms`.
    """
    sampled = sample_per_class(meta, per_class, seed)
    histograms = []
    for done, path in enumerate(sampled["path"], start=1):
        histograms.append(image_histogram(path, bins))
        if progress:
            progress(done / len(sampled))
    return class_histograms(list(sampled["label"]), histograms)

