"""Folds: groups never straddle folds, classes stay balanced, near-duplicate pictures share a group."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import distinct_picture

from covidscan.datasets import ImageDataset, Item, apply_split_file, open_dataset, write_split_file
from covidscan.errors import DatasetError
from covidscan.folds import assign_folds, base_groups, dataset_groups, inner_validation, merge_groups, source_group


@pytest.mark.parametrize("seed", range(8))
def test_folds_keep_every_group_whole_and_balance_classes(seed):
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for g in range(int(rng.integers(40, 90))):
        label = int(rng.integers(0, 3))
        for _ in range(int(rng.integers(1, 6))):  # patients with 1-5 images each
            groups.append(f"p{g}")
            labels.append(label)
    folds = assign_folds(labels, groups, folds=5, seed=seed)
    assert set(folds) == set(range(5))
    for group in set(groups):
        assert len({folds[i] for i, g in enumerate(groups) if g == group}) == 1
    overall = np.bincount(labels, minlength=3) / len(labels)
    for fold in range(5):
        share = np.bincount(np.asarray(labels)[folds == fold], minlength=3) / (folds == fold).sum()
        assert np.abs(share - overall).max() < 0.2
    # Seeded: the same seed gives the same folds, another seed other folds.
    assert (assign_folds(labels, groups, 5, seed) == folds).all()
    assert not (assign_folds(labels, groups, 5, seed + 100) == folds).all()


def test_too_few_groups_for_the_folds_is_a_clear_error():
    with pytest.raises(DatasetError, match="too few for 5 folds"):
        assign_folds([0, 1, 0, 1], ["a", "a", "b", "c"], folds=5)


def test_inner_validation_is_grouped_and_about_the_fraction():
    groups = [f"g{i // 2}" for i in range(200)]
    labels = [(i // 2) % 2 for i in range(200)]
    mask = inner_validation(labels, groups, 0.2, seed=1)
    assert 0.15 < mask.mean() < 0.25
    by_group = {}
    for g, m in zip(groups, mask):
        by_group.setdefault(g, set()).add(bool(m))
    assert all(len(v) == 1 for v in by_group.values())


def test_source_group_names_the_preprint_or_the_case_before_the_percent_sign():
    assert source_group(Path("CT_COVID/2020.02.10.20021584-p6-52%0.png")) == "CT_COVID/2020.02.10.20021584"
    assert source_group(Path("CT_COVID/2020.02.10.20021584-p7-12.png")) == "CT_COVID/2020.02.10.20021584"
    assert source_group(Path("CT_NonCOVID/1%3.png")) == "CT_NonCOVID/1"
    assert source_group(Path("Normal/01.jpeg")) != source_group(Path("Covid/01.jpeg"))


def test_merge_groups_joins_chains_of_pairs():
    merged = merge_groups(["a", "b", "c", "d", "e"], [(0, 1), (1, 3)])
    assert merged[0] == merged[1] == merged[3] == "a"
    assert merged[2] == "c" and merged[4] == "e"


def test_a_picture_saved_twice_under_two_names_joins_one_group(tmp_path):
    for k, name in enumerate(("COVID", "Normal")):
        for i in range(6):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(distinct_picture(100 * k + i, 200 - 100 * k)).save(tmp_path / name / f"{name}_{i}.png")
    # The same picture again, re-encoded as JPEG and resized, filed under the other class.
    Image.fromarray(distinct_picture(3, 200)).resize((80, 80)).save(tmp_path / "Normal" / "copy.jpg", quality=85)
    dataset = open_dataset("folder", tmp_path)
    groups = dataset_groups(dataset)
    by_name = {item.path.name: g for item, g in zip(dataset.items, groups)}
    assert by_name["copy.jpg"] == by_name["COVID_3.png"]
    assert len(set(groups)) == len(groups) - 1
    assert len(set(base_groups(dataset))) == len(groups)


def test_split_file_round_trip_reassigns_splits_and_refuses_another_dataset(tmp_path):
    root = tmp_path / "data"
    for name in ("A", "B"):
        for i in range(4):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(distinct_picture(i + (10 if name == "B" else 0), 200)).save(root / name / f"{i}.png")
    dataset = open_dataset("folder", root)
    splits = ["holdout" if i % 4 == 0 else ("val" if i % 4 == 1 else ("train" if i % 4 == 2 else None))
              for i in range(len(dataset.items))]
    split_file = write_split_file(tmp_path / "s.json", dataset, splits)
    again = open_dataset("folder", root, split_file=str(split_file))
    assert [item.split for item in again.items] == splits
    assert len(open_dataset("folder", root, split="holdout", split_file=str(split_file))) == 2
    other = ImageDataset("folder", tmp_path, ["A"], None, [Item(tmp_path / "elsewhere.png", 0)])
    with pytest.raises(DatasetError, match="another dataset folder"):
        apply_split_file(other, split_file)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot be read"):
        open_dataset("folder", root, split_file=str(tmp_path / "bad.json"))
