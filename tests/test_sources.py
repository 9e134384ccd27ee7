"""Extra data sources: a class-per-folder X-ray set plus ieee8023 images mapped onto its classes,
grouped across both sources, and out-of-fold estimates per source."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import distinct_picture

from covidscan.cli import main
from covidscan.datasets import open_dataset, write_split_file
from covidscan.errors import DatasetError, TrainingError
from covidscan.sources import DEFAULT_CLASS_MAPS, add_sources, describe_sources, parse_source, source_spec
from covidscan.estimate import estimates_by
from covidscan.folds import assign_folds, base_groups, dataset_groups

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = ("Covid", "Normal", "Viral Pneumonia")
BRIGHTNESS = {"Covid": 230, "Normal": 60, "Viral Pneumonia": 150}
# ieee8023 rows: (patient, finding); the first image is a copy of the folder's Covid/Covid0.png.
IEEE_ROWS = [("1", "COVID-19"), ("1", "COVID-19"), ("2", "COVID-19, ARDS"), ("3", "COVID-19"), ("4", "No Finding"),
             ("5", "No Finding"), ("6", "SARS"), ("7", "Influenza"), ("8", "Streptococcus"), ("9", "todo")]


def make_folder(root: Path, per_class: int = 6) -> Path:
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(distinct_picture(100 * k + i, BRIGHTNESS[name], size=48)).save(root / name / f"{name}{i}.png")
    return root


def make_ieee(root: Path, folder: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = ["patientid,finding,view,modality,folder,filename"]
    for i, (patient, finding) in enumerate(IEEE_ROWS):
        name = f"x{i}.jpg"
        if i == 0:  # the same picture as the folder's Covid0.png, resized and re-encoded
            Image.open(folder / "Covid" / "Covid0.png").resize((64, 64)).save(root / "images" / name, quality=90)
        else:
            value = BRIGHTNESS["Covid" if "COVID" in finding else "Normal" if finding == "No Finding" else "Viral Pneumonia"]
            Image.fromarray(distinct_picture(5000 + i, value, size=48)).save(root / "images" / name, quality=95)
        lines.append(f"{patient},\"{finding}\",PA,X-ray,images,{name}")
    lines.append("10,COVID-19,L,X-ray,images,lateral.jpg")  # lateral: not frontal, not read
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sources")
    folder = make_folder(base / "xray3")
    return folder, make_ieee(base / "ieee", folder)


def merged(roots, **spec_changes):
    folder, ieee = roots
    return open_dataset("folder", folder, extra_sources=[{**source_spec("ieee8023", ieee), **spec_changes}])


def test_ieee8023_images_join_the_folder_classes_through_the_class_map(roots):
    data = merged(roots)
    assert data.classes == list(CLASSES)
    # COVID-19 (ARDS too) -> Covid, No Finding -> Normal, SARS/Influenza -> Viral Pneumonia; bacterial and todo gone.
    assert data.source_counts() == {"folder": {"Covid": 6, "Normal": 6, "Viral Pneumonia": 6},
                                    "ieee8023": {"Covid": 4, "Normal": 2, "Viral Pneumonia": 2}}
    assert data.class_counts() == {"Covid": 10, "Normal": 8, "Viral Pneumonia": 8}
    ieee_items = [item for item in data.items if item.source == "ieee8023"]
    assert {item.path.name for item in ieee_items} == {f"x{i}.jpg" for i in range(8)}
    assert all(item.source == "folder" and item.patient_id is None for item in data.items if item not in ieee_items)
    assert {item.patient_id for item in ieee_items} == {"1", "2", "3", "4", "5", "6", "7"}
    assert {item.split for item in ieee_items} <= {"train", "val"}
    assert data.sources["ieee8023"]["class_map"] == DEFAULT_CLASS_MAPS["ieee8023"]
    assert any("8 of 9 images added" in note and "other dropped" in note for note in data.notes)
    frame = data.metadata()
    assert frame.source.value_counts().to_dict() == {"folder": 18, "ieee8023": 8}
    assert frame[frame.filename == "x6.jpg"].finding.item() == "SARS"  # the source's own metadata comes along
    # A split keeps its sources; a dataset without extra sources has no source column.
    val = open_dataset("folder", roots[0], split="val", extra_sources=[source_spec("ieee8023", roots[1])])
    assert set(val.sources) == {"folder", "ieee8023"}
    assert "source" not in open_dataset("folder", roots[0]).metadata().columns


def test_card_record_of_the_sources_names_kind_folder_map_and_counts(roots):
    data = merged(roots)
    record = describe_sources(pooled=data)
    assert record["folder"] == {"kind": "folder", "root": "xray3", "class_map": None,
                                "pooled_counts": {"Covid": 6, "Normal": 6, "Viral Pneumonia": 6}}
    assert record["ieee8023"]["root"] == "ieee" and record["ieee8023"]["class_map"]["other"] is None
    json.dumps(record)  # goes into a model card


def test_a_custom_class_map_can_drop_classes_and_bad_maps_get_clear_messages(roots):
    data = merged(roots, class_map={"COVID-19": "covid", "No Finding": None, "viral pneumonia": None, "other": None})
    assert data.source_counts()["ieee8023"] == {"Covid": 4, "Normal": 0, "Viral Pneumonia": 0}
    with pytest.raises(DatasetError, match="Class 'other' of extra source ieee8023 maps nowhere"):
        merged(roots, class_map={"COVID-19": "Covid", "No Finding": "Normal", "viral pneumonia": "Viral Pneumonia"})
    with pytest.raises(DatasetError, match="maps 'COVID-19' to 'Pneumonia', which is not a class"):
        merged(roots, class_map={**DEFAULT_CLASS_MAPS["ieee8023"], "COVID-19": "Pneumonia"})
    with pytest.raises(DatasetError, match="Extra source ieee8023: The dataset folder .* does not exist"):
        open_dataset("folder", roots[0], extra_sources=[source_spec("ieee8023", roots[1] / "nope")])
    with pytest.raises(DatasetError, match="needs a kind and a root"):
        open_dataset("folder", roots[0], extra_sources=[{"kind": "ieee8023"}])
    with pytest.raises(DatasetError, match="Unknown extra source kind"):
        parse_source("kaggle:/data")
    with pytest.raises(DatasetError, match="KIND:FOLDER"):
        parse_source("ieee8023")
    # Without a class map, classes of the same name match (a second folder of the same classes).
    data = open_dataset("folder", roots[0], extra_sources=[{"kind": "folder", "root": str(roots[0])}])
    assert set(data.sources) == {"folder", "folder:xray3"} and len(data) == 36


def test_split_files_name_extra_source_images_by_source_and_round_trip(roots, tmp_path):
    data = merged(roots)
    splits = ["holdout" if i % 3 == 0 else "train" for i in range(len(data))]
    path = write_split_file(tmp_path / "s.json", data, splits)
    keys = json.loads(path.read_text())["splits"]
    assert "ieee8023:images/x0.jpg" in keys and "Covid/Covid0.png" in keys
    again = open_dataset("folder", roots[0], extra_sources=[source_spec("ieee8023", roots[1])], split_file=str(path))
    assert [item.split for item in again.items] == splits


def test_a_picture_in_both_sources_and_a_patients_images_share_one_fold_group(roots):
    data = merged(roots)
    groups = dataset_groups(data)
    by_name = {item.path.name: g for item, g in zip(data.items, groups)}
    assert by_name["Covid0.png"] == by_name["x0.jpg"] == by_name["x1.jpg"]  # copy + same patient (1)
    base = dict(zip((item.path.name for item in data.items), base_groups(data)))
    assert base["x0.jpg"] == base["x1.jpg"] == "patient/ieee8023/1" and base["Covid0.png"] != base["x0.jpg"]
    spanning = [g for g in set(groups) if len({item.source for item, h in zip(data.items, groups) if h == g}) > 1]
    assert len(spanning) == 1
    for seed in range(4):
        folds = assign_folds(data.labels(), groups, 3, seed=seed)
        names = [item.path.name for item in data.items]
        assert len({folds[names.index(n)] for n in ("Covid0.png", "x0.jpg", "x1.jpg")}) == 1


def test_estimates_by_source_match_the_known_accuracies():
    # Source a: 20 images all right; source b: 20 images, 10 right. Two classes, one image per group.
    y = np.array([0, 1] * 20)
    right = np.ones(40, dtype=bool)
    right[20:30] = False
    predicted = np.where(right, y, 1 - y)
    probs = np.eye(2)[predicted] * 0.8 + 0.1
    subsets = ["a"] * 20 + ["b"] * 20
    result = estimates_by(subsets, y, probs, [str(i) for i in range(40)], ["COVID", "Normal"], "synthetic", samples=200)
    assert list(result) == ["all", "a", "b"]
    assert result["all"]["accuracy"] == pytest.approx(0.75) and result["all"]["n"] == 40
    assert result["a"]["accuracy"] == 1.0 and result["a"]["n"] == 20 and result["a"]["ci95"]["accuracy"] == [1.0, 1.0]
    assert result["b"]["accuracy"] == pytest.approx(0.5) and result["b"]["groups"] == 20
    low, high = result["b"]["ci95"]["accuracy"]
    assert low < 0.5 < high and "Subset: the 20 images of b." in result["b"]["protocol"]


def test_cv_over_both_sources_records_them_and_reports_per_source(roots, tmp_path, capsys):
    folder, ieee = roots
    out = tmp_path / "cv"
    code = main(["cv", "--dataset", "folder", "--root", str(folder), "--extra-source", f"ieee8023:{ieee}",
                 "--arch", "tiny_cnn", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--device", "cpu",
                 "--modality", "X-ray", "--folds", "2", "--bootstrap", "100", "--out", str(out)])
    assert code == 0
    card = json.loads((out / "model" / "card.json").read_text())
    data = card["training"]["data"]
    assert data["options"]["extra_sources"][0]["class_map"] == DEFAULT_CLASS_MAPS["ieee8023"]
    assert data["sources"]["ieee8023"]["pooled_counts"] == {"Covid": 4, "Normal": 2, "Viral Pneumonia": 2}
    fold_card = json.loads((out / "r0-f0" / "model" / "card.json").read_text())
    assert set(fold_card["training"]["data"]["sources"]) == {"folder", "ieee8023"}
    oof = (out / "oof.csv").read_text()
    assert oof.count("\nieee8023:images/") == 8 and oof.count("\nCovid/") == 6
    capsys.readouterr()
    assert main(["cv-report", str(out), "--json", "--bootstrap", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [report[k]["n"] for k in ("all", "folder", "ieee8023")] == [26, 18, 8]
    assert report["all"]["accuracy"] == pytest.approx(card["metrics"]["estimate"]["accuracy"])
    assert main(["cv-report", str(out), "--bootstrap", "100"]) == 0
    table = capsys.readouterr().out
    assert "Covid recall" in table and any(line.startswith("ieee8023") for line in table.splitlines())
    assert main(["cv-report", str(tmp_path)]) == 2
    assert "is not a finished cross-validation folder" in capsys.readouterr().err
    assert main(["train", "--dataset", "folder", "--root", str(folder), "--extra-source", "ieee8023",
                 "--modality", "X-ray", "--out", str(tmp_path / "t")]) == 2
    assert "KIND:FOLDER" in capsys.readouterr().err


def test_add_sources_accepts_one_spec_and_refuses_a_repeated_name(roots):
    data = open_dataset("folder", roots[0])
    add_sources(data, source_spec("ieee8023", roots[1], name="chestxray"))
    assert set(data.sources) == {"folder", "chestxray"} and len(data.raw_metadata) == len(data.items) == 26
    with pytest.raises(DatasetError, match="Two sources are named 'chestxray'"):
        add_sources(data, [source_spec("ieee8023", roots[1], name="chestxray")])


# ------------------------------------------------------------------------ real data (when present)
@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_real_3class_folder_plus_ieee8023_counts_and_cross_source_copies():
    ieee_root = SHARED / "covid-chestxray"
    assert len(list((ieee_root / "images").iterdir())) == 538
    ieee = open_dataset("ieee8023", ieee_root)
    assert len(ieee) == 514 and ieee.class_counts() == {"COVID-19": 411, "No Finding": 19, "viral pneumonia": 21,
                                                         "other": 63}
    data = open_dataset("folder", SHARED / "covid19-image-dataset-3class", extra_sources=[source_spec("ieee8023", ieee_root)])
    assert data.source_counts() == {"folder": {"Covid": 104, "Normal": 69, "Viral Pneumonia": 70},
                                    "ieee8023": {"Covid": 411, "Normal": 19, "Viral Pneumonia": 21}}
    groups = dataset_groups(data)
    members: dict[str, set] = {}
    for item, group in zip(data.items, groups):
        members.setdefault(group, set()).add(item.source)
    spanning = [g for g, sources in members.items() if len(sources) == 2]
    # The Kaggle "Covid" folder repeats ieee8023 pictures: at the default pHash distance, 19 groups span both.
    assert len(spanning) == 19 and len(set(groups)) == 478


def test_per_source_estimate_of_a_cv_folder_knows_each_images_source(roots, tmp_path):
    from covidscan.cv import oof_estimates_by_source
    from covidscan.training import TrainConfig

    folder, ieee = roots
    config = TrainConfig(dataset="folder", root=str(folder), modality="X-ray",
                         dataset_options={"extra_sources": [source_spec("ieee8023", ieee)]})
    data = merged(roots)
    # Folder images predicted right, ieee8023 images wrong (the next class): accuracies 1 and 0.
    lines = ["path,group,label_index,repeat,fold," + ",".join(f"logit[{c}]" for c in CLASSES)]
    for index, item in enumerate(data.items):
        predicted = item.label if item.source == "folder" else (item.label + 1) % 3
        logits = [3.0 if k == predicted else 0.0 for k in range(3)]
        lines.append(f"{data.item_key(item)},g{index},{item.label},0,{index % 2}," + ",".join(map(str, logits)))
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    (cv_dir / "oof.csv").write_text("\n".join(lines) + "\n")
    (cv_dir / "cv.json").write_text(json.dumps({"options": {"bootstrap": 100, "seed": 0}, "train_config": config.to_dict()}))
    result = oof_estimates_by_source(cv_dir)
    assert result["folder"]["accuracy"] == 1.0 and result["folder"]["n"] == 18
    assert result["ieee8023"]["accuracy"] == 0.0 and result["ieee8023"]["n"] == 8
    assert result["all"]["accuracy"] == pytest.approx(18 / 26)
    assert result["folder"]["per_class"]["Covid"]["recall"] == 1.0
    # Without the extra source, its images are unknown to the dataset: a clear message, not a KeyError.
    (cv_dir / "cv.json").write_text(json.dumps({"options": {}, "train_config": {**config.to_dict(), "dataset_options": {}}}))
    with pytest.raises(TrainingError, match="8 out-of-fold images .* are not in the run's dataset"):
        oof_estimates_by_source(cv_dir)
    # A run of one source: every figure is that source's.
    only = [line for line in lines if not line.startswith("ieee8023:")]
    (cv_dir / "oof.csv").write_text("\n".join(only) + "\n")
    single = oof_estimates_by_source(cv_dir)
    assert list(single) == ["all", "folder"] and single["folder"]["ci95"] == single["all"]["ci95"]
