"""Datasets: the three layouts on tiny synthetic trees, and on ../shared/data when it is present."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.datasets import (DATASET_KINDS, CovidCTDataset, FolderDataset, IEEE8023Dataset, ImageDataset,
                                available_splits, ieee8023_class, open_dataset)
from covidscan.errors import DatasetError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_image(path: Path, value: int = 128, size: int = 40, seed: int = 0) -> Path:
    """A small grayscale PNG with a bright square (brightness ``value``) over noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, classes=("COVID", "Normal"), per_class: int = 10, size: int = 40) -> Path:
    """One sub-folder per class; class k has brightness 220 - 160 k so the classes are learnable."""
    for k, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{name}_{i}.png", value=int(220 - 160 * k / max(len(classes) - 1, 1)), size=size, seed=100 * k + i)
    return root


def make_covid_ct(root: Path, with_val: bool = True) -> Path:
    splits = {"train": 6, "val": 3} if with_val else {"train": 6}
    for name, folder, value in (("COVID", "CT_COVID", 220), ("NonCOVID", "CT_NonCOVID", 60)):
        for split, count in splits.items():
            files = [f"{name}_{split}_{i}.png" for i in range(count)]
            for i, file in enumerate(files):
                write_image(root / folder / file, value=value, seed=i)
            lists = root / "Data-split" / name
            lists.mkdir(parents=True, exist_ok=True)
            # One listed file does not exist: it must be skipped with a note, not crash.
            extra = ["missing.png"] if split == "train" else []
            (lists / f"{split}CT_{name}.txt").write_text("\n".join(files + extra) + "\n")
    meta = ["File name,Patient ID,Age,Gender,Severity,,"]
    meta += [f"COVID_{split}_{i}.png,Patient {i},{40 + i},M,mild,," for split in splits for i in range(splits[split])]
    (root / "COVID-CT-MetaInfo.csv").write_text("\n".join(meta) + "\n")
    noncovid = [",image name,patient id"] + [f"{i},NonCOVID_train_{i}.png,crawled_{i}" for i in range(6)]
    (root / "NonCOVID-CT-MetaInfo.csv").write_text("\n".join(noncovid) + "\n")
    return root


def make_ieee8023(root: Path) -> Path:
    rows = ["patientid,offset,sex,age,finding,survival,view,modality,folder,filename"]
    findings = ["COVID-19"] * 6 + ["No Finding"] * 3 + ["SARS"] * 2 + ["Streptococcus"] * 2
    for i, finding in enumerate(findings):
        patient = i // 2  # two images per patient
        name = f"img{i}.png"
        write_image(root / "images" / name, value=50 + 10 * i, seed=i)
        rows.append(f"{patient},0,F,{30 + i},{finding},Y,PA,X-ray,images,{name}")
    rows.append("99,0,M,50,COVID-19,Y,L,X-ray,images,lateral.png")  # lateral view: filtered out
    rows.append("98,0,M,50,todo,Y,PA,X-ray,images,todo.png")  # unlabelled: skipped
    rows.append("97,0,M,50,COVID-19,Y,AP,X-ray,images,not_there.png")  # missing file: counted
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_covid_ct_layout_splits_metadata_and_missing_split(tmp_path):
    root = make_covid_ct(tmp_path / "ct")
    everything = open_dataset("covid-ct", root)
    assert everything.classes == ["COVID", "NonCOVID"]
    assert available_splits("covid-ct", root) == ["train", "val"]
    assert {item.split for item in everything.items} == {"train", "val"}
    train = open_dataset("covid-ct", root, "train")
    assert isinstance(train, CovidCTDataset)
    assert train.class_counts() == {"COVID": 6, "NonCOVID": 6}
    assert any("missing.png" not in str(item.path) for item in train.items)
    assert any("not found" in note for note in train.notes)
    frame = train.metadata()
    assert len(frame) == 12
    assert {"path", "filename", "label", "label_index", "split", "patient_id", "Age", "Gender", "Severity"} <= set(frame.columns)
    covid_rows = frame[frame.label == "COVID"]
    assert set(covid_rows.patient_id) == {f"Patient {i}" for i in range(6)}
    assert set(frame[frame.label == "NonCOVID"].patient_id) == {f"crawled_{i}" for i in range(6)}
    with pytest.raises(DatasetError, match="no 'test' split"):
        open_dataset("covid-ct", root, "test")


def test_splits_joined_by_plus_open_as_one_pooled_dataset(tmp_path):
    root = make_covid_ct(tmp_path / "ct")
    train, val = open_dataset("covid-ct", root, "train"), open_dataset("covid-ct", root, "val")
    pooled = open_dataset("covid-ct", root, "train+val")
    assert pooled.split == "train+val"
    assert sorted(map(str, (item.path for item in pooled.items))) == sorted(
        str(item.path) for item in train.items + val.items)
    assert {item.split for item in pooled.items} == {"train", "val"}
    assert len(pooled.metadata()) == len(train) + len(val)
    with pytest.raises(DatasetError, match="no 'test' split"):
        open_dataset("covid-ct", root, "train+test")


def test_covid_ct_without_val_lists_has_only_train(tmp_path):
    root = make_covid_ct(tmp_path / "ct", with_val=False)
    assert available_splits("covid-ct", root) == ["train"]
    with pytest.raises(DatasetError, match="Available: train"):
        open_dataset("covid-ct", root, "val")


def test_invalid_roots_and_kinds_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset("folder", tmp_path / "nope")
    with pytest.raises(DatasetError, match="not a COVID-CT folder"):
        open_dataset("covid-ct", tmp_path)
    with pytest.raises(DatasetError, match="no metadata.csv"):
        open_dataset("ieee8023", tmp_path)
    with pytest.raises(DatasetError, match="at least two class sub-folders"):
        open_dataset("folder", tmp_path)
    with pytest.raises(DatasetError, match="Unknown dataset kind"):
        open_dataset("imagenet", tmp_path)
    assert DATASET_KINDS == ("covid-ct", "folder", "ieee8023")


def test_folder_gets_a_seeded_stratified_val_split(tmp_path):
    root = make_folder(tmp_path / "xr", classes=("Covid", "Normal", "Viral Pneumonia"), per_class=10)
    data = open_dataset("folder", root)
    assert isinstance(data, FolderDataset) and data.classes == ["Covid", "Normal", "Viral Pneumonia"]
    val = open_dataset("folder", root, "val")
    assert val.class_counts() == {"Covid": 2, "Normal": 2, "Viral Pneumonia": 2}
    train = open_dataset("folder", root, "train")
    assert set(train.metadata().path).isdisjoint(set(val.metadata().path))
    assert len(train) + len(val) == 30
    # Same seed, same split; another seed, another split.
    again = open_dataset("folder", root, "val")
    assert [i.path for i in again.items] == [i.path for i in val.items]
    other = open_dataset("folder", root, "val", seed=1)
    assert [i.path for i in other.items] != [i.path for i in val.items]


def test_folder_with_its_own_splits_uses_them(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=4)
    make_folder(tmp_path / "d" / "val", per_class=2)
    assert available_splits("folder", tmp_path / "d") == ["train", "val"]
    assert open_dataset("folder", tmp_path / "d", "val").class_counts() == {"COVID": 2, "Normal": 2}


def test_ieee8023_filters_views_maps_classes_and_splits_by_patient(tmp_path):
    root = make_ieee8023(tmp_path / "ieee")
    data = open_dataset("ieee8023", root)
    assert data.classes == ["COVID-19", "No Finding", "viral pneumonia", "other"]
    assert data.class_counts() == {"COVID-19": 6, "No Finding": 3, "viral pneumonia": 2, "other": 2}
    assert data.skipped_missing == 1
    assert isinstance(data, IEEE8023Dataset) and isinstance(data, ImageDataset)
    assert any("not in the folder" in note for note in data.notes)
    frame = data.metadata()
    assert {"sex", "age", "finding", "view"} <= set(frame.columns)
    assert "lateral.png" not in set(frame.filename)
    train_patients = set(frame[frame.split == "train"].patient_id)
    val_patients = set(frame[frame.split == "val"].patient_id)
    assert val_patients and train_patients and train_patients.isdisjoint(val_patients)
    assert ieee8023_class("COVID-19, ARDS") == "COVID-19"
    assert ieee8023_class("Influenza") == "viral pneumonia"
    assert ieee8023_class("todo") is None


# ------------------------------------------------------------------------ real data (when present)
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


@pytest.mark.shared_data
@needs_shared
def test_real_covid_ct_official_split_counts():
    data = open_dataset("covid-ct", SHARED / "covid-ct")
    assert available_splits("covid-ct", SHARED / "covid-ct") == ["train", "val"]
    assert open_dataset("covid-ct", SHARED / "covid-ct", "train").class_counts() == {"COVID": 191, "NonCOVID": 234}
    assert open_dataset("covid-ct", SHARED / "covid-ct", "val").class_counts() == {"COVID": 60, "NonCOVID": 58}
    frame = data.metadata()
    assert frame.patient_id.notna().all() and "Severity" in frame.columns


@pytest.mark.shared_data
@needs_shared
def test_real_folder_and_ieee8023():
    xray = open_dataset("folder", SHARED / "covid19-image-dataset-3class")
    assert xray.classes == ["Covid", "Normal", "Viral Pneumonia"] and len(xray) == 243
    ieee = open_dataset("ieee8023", SHARED / "covid-chestxray")
    frame = ieee.metadata()
    assert set(frame.view) <= {"PA", "AP", "AP Supine"}
    assert set(frame[frame.split == "train"].patient_id).isdisjoint(set(frame[frame.split == "val"].patient_id))


def test_load_split_for_aligns_classes_to_the_model_and_decodes_at_its_size(tmp_path):
    from covidscan.bundle import ModelCard
    from covidscan.datasets import align_classes, load_split_for

    root = make_folder(tmp_path / "data", classes=("COVID", "Normal"), per_class=5)
    # The model lists its classes in another order and spelling: labels follow the model's order.
    card = ModelCard.for_architecture("m", "tiny_cnn", ["normal", "covid"], "CT", input_size=32)
    data, y_true, images = load_split_for(card, "folder", root, "val", {"val_fraction": 0.4})
    assert images.shape == (len(data.items), 3, 32, 32) and str(images.dtype) == "torch.uint8"
    expected = [1 - label for label in data.labels()]
    assert y_true.tolist() == expected and set(expected) == {0, 1}
    assert align_classes(["COVID", "Normal"], ["Normal", "COVID"]) == [1, 0]
    with pytest.raises(DatasetError, match="Viral unknown to the model"):
        align_classes(["COVID", "Viral"], ["COVID", "Normal"])
