"""Cross-validation folds that never put one patient, or one picture saved twice, in two folds.

Images are grouped before folds are drawn:

- by patient where the metadata names one (ieee8023);
- for COVID-CT, where most slices have no usable patient id, by the source prefix of the file
  name: the preprint a figure was cut from (``2020.02.10.20021584-p6-52%0.png`` ->
  ``2020.02.10.20021584``), or the part before ``%`` (``1%0.png`` -> ``1``: slices of one crawled case);
- images whose perceptual hashes lie within a few bits of each other (re-encoded or resized
  copies, as the Dataset explorer's leakage check finds them) join one group across classes and
  sources, including the merged ``extra_sources`` of a dataset (the Kaggle 3-class X-ray "Covid"
  images are largely copies of ieee8023 images).

Folds are then stratified by class over whole groups (scikit-learn's ``StratifiedGroupKFold``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from covidscan.datasets import ImageDataset
from covidscan.errors import DatasetError

#: Largest pHash Hamming distance (of 64 bits) at which two images count as the same picture.
NEAR_DUPLICATE_DISTANCE = 4
_PREPRINT = re.compile(r"^(\d{4}\.\d{2}\.\d{2}\.\d+)")


def source_group(path: Path) -> str:
    """The source an image file came from, from its name alone (its class folder included).

    Args:
        path: the image's path.

    Returns:
        ``folder/prefix``: the preprint id for COVID-CT figure crops, else the file stem before ``%``.
    """
    match = _PREPRINT.match(path.stem)
    prefix = match.group(1) if match else path.stem.split("%")[0]
    return f"{path.parent.name}/{prefix}"


def base_groups(dataset: ImageDataset) -> list[str]:
    """One group name per item before near-duplicates are merged: the patient, else the file's source."""
    groups = []
    several = len(dataset.sources) > 1
    for item in dataset.items:
        source = dataset.source_of(item)
        kind = dataset.sources.get(source, {}).get("kind", dataset.kind)
        # COVID-CT's "Patient 1" ids restart in every preprint, so they do not name a person there.
        if item.patient_id and kind != "covid-ct":
            # Patient ids are only unique within their own source.
            groups.append(f"patient/{source}/{item.patient_id}" if several else f"patient/{item.patient_id}")
        else:
            group = source_group(item.path)
            groups.append(f"{source}:{group}" if several and source != dataset.kind else group)
    return groups


def merge_groups(groups: Sequence[str], pairs: Sequence[tuple[int, int]]) -> list[str]:
    """Join the groups of every pair of items (union-find); each merged group takes its smallest name.

    Args:
        groups: the group name of each item.
        pairs: (i, j) item indices that must share a group.

    Returns:
        The merged group name of each item.
    """
    parent = {name: name for name in groups}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for i, j in pairs:
        a, b = root(groups[i]), root(groups[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(name) for name in groups]


def near_duplicate_pairs(dataset: ImageDataset, max_distance: int = NEAR_DUPLICATE_DISTANCE,
                         hashes: Sequence[int | None] | None = None) -> list[tuple[int, int]]:
    """Item index pairs whose perceptual hashes differ in at most ``max_distance`` bits.

    Args:
        dataset: the images.
        max_distance: the Hamming distance still called the same picture.
        hashes: precomputed :func:`covidscan.leakage.image_hashes` in item order (computed if None).

    Returns:
        (i, j) pairs with i < j.
    """
    from covidscan.leakage import image_hashes, near_duplicates

    meta = dataset.metadata()
    if hashes is None:
        hashes = image_hashes(meta["path"].tolist())
    pairs = near_duplicates(meta, hashes, max_distance=max_distance, include_same_split_and_class=True)
    index = {path: i for i, path in enumerate(meta["path"])}
    return [tuple(sorted((index[a], index[b]))) for a, b in zip(pairs["path_a"], pairs["path_b"])]


def dataset_groups(dataset: ImageDataset, near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE,
                   hashes: Sequence[int | None] | None = None) -> list[str]:
    """The group of every item: patient or source, merged across near-duplicate pictures.

    Args:
        dataset: the images.
        near_duplicate_distance: pHash distance for merging (None: do not look for near-duplicates).
        hashes: precomputed perceptual hashes in item order.

    Returns:
        One group name per item.
    """
    groups = base_groups(dataset)
    if near_duplicate_distance is None:
        return groups
    return merge_groups(groups, near_duplicate_pairs(dataset, near_duplicate_distance, hashes))


def assign_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """A fold index (0..folds-1) per item: every group in one fold, classes balanced across folds.

    Args:
        labels: class index per item.
        groups: group name per item.
        folds: number of folds (at least 2).
        seed: shuffles which groups go together.

    Returns:
        int array of fold indices, in item order.

    Raises:
        DatasetError: fewer groups than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    if folds < 2:
        raise DatasetError("Cross-validation needs at least 2 folds.")
    distinct = len(set(groups))
    if distinct < folds:
        raise DatasetError(f"Only {distinct} independent groups of images (patients/sources): too few for {folds} folds.")
    assignment = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            assignment[held_out] = fold
    except ValueError as exc:  # e.g. more folds than images in every class
        raise DatasetError(f"These images cannot be split into {folds} folds ({exc}).") from None
    return assignment


def inner_validation(labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """A boolean mask of a grouped, stratified ``fraction`` of the items (the training folds' own val split).

    Args:
        labels, groups: per item.
        fraction: share of the items to pick, between 0 and 0.5.
        seed: which groups are picked.

    Returns:
        bool array, True for validation items.
    """
    if not 0 < fraction <= 0.5:
        raise DatasetError(f"The inner validation fraction must lie in (0, 0.5], not {fraction}.")
    # A small training part cannot give every class to 1/fraction parts: use fewer (a larger share).
    parts = max(2, min(round(1 / fraction), int(np.bincount(np.asarray(labels)).max()), len(set(groups))))
    return assign_folds(labels, groups, parts, seed) == 0
