"""Leakage checks: the same picture twice (perceptual hashes) and patients in several splits.

Near-duplicate images that straddle splits leak test images into training; pairs with different
labels are label conflicts; a patient whose images sit in two splits is a patient-level leak.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from covidscan.errors import CovidscanError
from covidscan.image_stats import load_pixels


def perceptual_hash(path: str | Path, hash_size: int = 8) -> int | None:
    """The pHash (DCT perceptual hash, ``imagehash.phash``) of an image as an integer.

    Returns:
        ``hash_size**2`` bits packed into an int, or None when the file cannot be read.
    """
    import imagehash

    try:
        image = Image.fromarray(load_pixels(path)).convert("L")
    except CovidscanError:
        return None
    bits = imagehash.phash(image, hash_size=hash_size).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def image_hashes(
    paths: Sequence[str],
    hash_size: int = 8,
    progress: Callable[[float], None] | None = None,
) -> list[int | None]:
    """:func:`perceptual_hash` of every path, in order (None for unreadable files)."""
    hashes = []
    for done, path in enumerate(paths, start=1):
        hashes.append(perceptual_hash(path, hash_size))
        if progress:
            progress(done / len(paths))
    return hashes


def _pair_kind(same_split: bool, same_label: bool) -> str:
    if not same_split and not same_label:
        return "other split and class"
    if not same_split:
        return "other split"
    if not same_label:
        return "other class"
    return "same split and class"


def near_duplicates(
    meta: pd.DataFrame,
    hashes: Sequence[int | None],
    max_distance: int = 4,
    include_same_split_and_class: bool = False,
    block: int = 256,
) -> pd.DataFrame:
    """Pairs of images whose perceptual hashes differ in at most ``max_distance`` bits.

    The same picture saved twice (re-encoded, resized, slightly cropped) gives hashes a few bits
    apart. Pairs that straddle splits leak test images into training; pairs with different labels
    are label conflicts. By default only those pairs are listed.

    Args:
        meta: metadata rows in the same order as ``hashes``.
        hashes: 64-bit ints from :func:`image_hashes` (None rows are skipped).
        max_distance: largest Hamming distance still called a near-duplicate.
        include_same_split_and_class: also list duplicates inside one split and class.
        block: rows compared at once (bounds memory on large datasets).

    Returns:
        DataFrame with ``distance``, ``kind`` and, for both images a/b, ``filename``, ``split``,
        ``label``, ``patient_id``, ``path``; closest pairs first.
    """
    if len(hashes) != len(meta):
        raise ValueError("hashes and metadata rows differ in length")
    valid = np.array([h is not None for h in hashes], dtype=bool)
    index = np.flatnonzero(valid)
    values = np.array([hashes[i] for i in index], dtype=np.uint64)
    found_a, found_b, found_d = [], [], []
    for start in range(0, len(values), block):
        chunk = values[start:start + block]
        distances = np.bitwise_count(chunk[:, None] ^ values[None, :])
        rows, cols = np.nonzero(distances <= max_distance)
        upper = cols > rows + start  # each unordered pair once, never an image with itself
        found_a.append(rows[upper] + start)
        found_b.append(cols[upper])
        found_d.append(distances[rows[upper], cols[upper]])
    columns = ["distance", "kind"] + [f"{f}_{s}" for s in "ab"
                                      for f in ("filename", "split", "label", "patient_id", "path")]
    if not found_a:
        return pd.DataFrame(columns=columns)
    a = index[np.concatenate(found_a)]
    b = index[np.concatenate(found_b)]
    table = meta.reset_index(drop=True)
    pairs = pd.DataFrame({"distance": np.concatenate(found_d).astype(int)})
    for side, rows in (("a", a), ("b", b)):
        for field in ("filename", "split", "label", "patient_id", "path"):
            pairs[f"{field}_{side}"] = table[field].to_numpy()[rows] if len(rows) else []
    same_split = pairs["split_a"] == pairs["split_b"]
    same_label = pairs["label_a"] == pairs["label_b"]
    pairs["kind"] = [_pair_kind(s, l) for s, l in zip(same_split, same_label)]
    if not include_same_split_and_class:
        pairs = pairs[~(same_split & same_label)]
    return pairs[columns].sort_values(["distance", "filename_a"], kind="stable").reset_index(drop=True)


def patients_in_several_splits(meta: pd.DataFrame) -> pd.DataFrame:
    """Patients whose images sit in more than one split (a patient-level leak).

    Returns:
        DataFrame with ``patient_id``, ``splits`` (comma-joined), ``classes``, ``images``,
        one row per such patient, most images first.
    """
    known = meta.dropna(subset=["patient_id"])
    columns = ["patient_id", "splits", "classes", "images"]
    if known.empty:
        return pd.DataFrame(columns=columns)
    grouped = known.groupby("patient_id")
    table = pd.DataFrame({
        "splits": grouped["split"].agg(lambda s: ", ".join(sorted(set(s)))),
        "n_splits": grouped["split"].nunique(),
        "classes": grouped["label"].agg(lambda s: ", ".join(sorted(set(s)))),
        "images": grouped.size(),
    }).reset_index()
    table = table[table["n_splits"] > 1]
    return table[columns].sort_values(["images", "patient_id"], ascending=[False, True]).reset_index(drop=True)

