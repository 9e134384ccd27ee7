"""Datasets: one small contract (items, classes, metadata, split) over three folder layouts.

- ``covid-ct``: the UCSD COVID-CT layout (``CT_COVID/``, ``CT_NonCOVID/``,
  ``Data-split/{COVID,NonCOVID}/{train,val,test}CT_*.txt`` and the metadata csv/xlsx files).
- ``folder``: one sub-folder per class, optionally under ``train/``, ``val/``, ``test/``; a folder
  without its own validation split gets a seeded, stratified one.
- ``ieee8023``: the COVID-19 image data collection (``metadata.csv`` + ``images/``), filtered by
  view, mapped to classes and split by patient.

Any layout can take ``extra_sources``: further datasets whose classes are mapped onto its own
(:func:`covidscan.sources.add_sources`; e.g. the ieee8023 X-rays added to the 3-class X-ray folder). Every item
knows its source, so estimates can be reported per source.

Opening a dataset decodes no pixels. :func:`load_split_images` decodes a split once, through
:func:`covidscan.images.read_image`, at a model's input size (training, evaluation, ensembles);
:func:`load_split_for` prepares a split for one model card (classes aligned, the card's window).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd

from covidscan.errors import DatasetError

if TYPE_CHECKING:
    import torch

    from covidscan.bundle import ModelCard

DATASET_KINDS = ("covid-ct", "folder", "ieee8023")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom"}


@dataclass
class Item:
    """One image of a dataset."""

    path: Path
    label: int  # index into the dataset's classes
    patient_id: str | None = None
    split: str | None = None
    source: str | None = None  # name of the dataset it came from (see ImageDataset.sources)


@dataclass
class ImageDataset:
    """Items of one layout, with their class names and raw metadata."""

    kind: str
    root: Path
    classes: list[str]
    split: str | None
    items: list[Item]
    # Raw metadata rows aligned with ``items`` (layout-specific columns), and notes for the user.
    raw_metadata: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Source name -> {"kind", "root" (Path), "class_map" (source class -> class, None: dropped; None for
    # the dataset's own images)}; the first is the dataset itself (named by its kind).
    sources: dict[str, dict] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int]:
        """Class index of every item, in item order."""
        return [item.label for item in self.items]

    def class_counts(self) -> dict[str, int]:
        """Number of items per class name (every class listed, zero included)."""
        counts = {name: 0 for name in self.classes}
        for item in self.items:
            counts[self.classes[item.label]] += 1
        return counts

    def source_of(self, item: Item) -> str:
        """The name of the source an item came from (the dataset's kind for its own images)."""
        return item.source or self.kind

    def item_key(self, item: Item) -> str:
        """A portable name of the item: its path relative to the root (``source:path`` for extra sources)."""
        source = self.source_of(item)
        if source == self.kind or source not in self.sources:
            return _relative(item.path, self.root)
        return f"{source}:{_relative(item.path, self.sources[source]['root'])}"

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Number of items per source and class name (every class listed, zero included)."""
        counts: dict[str, dict[str, int]] = {name: {c: 0 for c in self.classes} for name in self.sources}
        for item in self.items:
            counts.setdefault(self.source_of(item), {c: 0 for c in self.classes})[self.classes[item.label]] += 1
        return counts

    def metadata(self) -> pd.DataFrame:
        """One row per item: path, filename, label, label_index, split, patient_id (+ source when the
        dataset merges several) + raw columns."""
        rows = []
        several = len(self.sources) > 1
        for index, item in enumerate(self.items):
            row = {
                "path": str(item.path),
                "filename": item.path.name,
                "label": self.classes[item.label],
                "label_index": item.label,
                "split": item.split,
                "patient_id": item.patient_id,
            }
            if several:
                row["source"] = self.source_of(item)
            extra = self.raw_metadata[index] if index < len(self.raw_metadata) else {}
            row.update({k: v for k, v in extra.items() if k not in row})
            rows.append(row)
        columns = ["path", "filename", "label", "label_index", "split", "patient_id"]
        return pd.DataFrame(rows, columns=None if rows else columns)

    def subset(self, split: str) -> "ImageDataset":
        """The items of one split (or of several joined by ``+``, e.g. ``train+val``), as a dataset of its own."""
        names = set(split.split("+"))
        keep = [i for i, item in enumerate(self.items) if item.split in names]
        subset = type(self)(
            kind=self.kind, root=self.root, classes=list(self.classes), split=split,
            items=[self.items[i] for i in keep],
            raw_metadata=[self.raw_metadata[i] for i in keep] if self.raw_metadata else [],
            notes=list(self.notes), sources=dict(self.sources),
        )
        if hasattr(self, "skipped_missing"):
            subset.skipped_missing = self.skipped_missing
        return subset


class CovidCTDataset(ImageDataset):
    """The UCSD COVID-CT layout."""


class FolderDataset(ImageDataset):
    """One sub-folder per class."""


class IEEE8023Dataset(ImageDataset):
    """The ieee8023 COVID-19 image data collection."""

    skipped_missing: int = 0  # metadata rows whose image file is missing


def open_dataset(kind: str, root: str | os.PathLike, split: str | None = None, **options) -> ImageDataset:
    """Open a dataset folder.

    Args:
        kind: one of :data:`DATASET_KINDS`.
        root: the dataset's folder.
        split: ``"train"``, ``"val"``, ``"test"``, several joined by ``+`` (``"train+val"``: the pooled
            images cross-validation uses), or None for every available split.
        **options: layout options (``folder``: ``val_fraction``, ``seed``; ``ieee8023``: ``views``,
            ``class_map``, ``val_fraction``, ``seed``); for every layout ``extra_sources``: further
            datasets merged in (see :func:`covidscan.sources.add_sources`), and ``split_file``: a JSON file from
            :func:`write_split_file` that assigns each image its split (cross-validation folds).

    Returns:
        The dataset; with ``split=None`` every item carries its own split.

    Raises:
        DatasetError: unknown kind, a folder that is not of that layout, or a split it lacks.
    """
    root = Path(root).expanduser()
    if kind not in _OPENERS:
        raise DatasetError(f"Unknown dataset kind '{kind}'. Choose one of: {', '.join(DATASET_KINDS)}.")
    if not root.is_dir():
        raise DatasetError(f"The dataset folder {root} does not exist or is not a folder.")
    split_file = options.pop("split_file", None)
    extra_sources = options.pop("extra_sources", None)
    dataset = _OPENERS[kind](root, **options)
    dataset.sources = {kind: {"kind": kind, "root": root, "class_map": None}}
    for item in dataset.items:
        item.source = kind
    if extra_sources:
        from covidscan.sources import add_sources  # sources open datasets themselves

        add_sources(dataset, extra_sources)
    if split_file is not None:
        apply_split_file(dataset, split_file)
    if split is None:
        return dataset
    available = sorted({item.split for item in dataset.items if item.split})
    missing = [name for name in split.split("+") if name not in available]
    if missing:
        raise DatasetError(
            f"The {kind} dataset at {root} has no '{missing[0]}' split. Available: {', '.join(available) or 'none'}."
        )
    return dataset.subset(split)


SPLIT_FILE_VERSION = 1


def write_split_file(path: str | os.PathLike, dataset: ImageDataset, splits: Sequence[str | None]) -> Path:
    """Save a split for every item of ``dataset`` (None: left out) as JSON, paths relative to its root.

    Args:
        path: the JSON file to write.
        dataset: the dataset whose items are assigned.
        splits: one split name (or None) per item, in item order.

    Returns:
        The written path.
    """
    if len(splits) != len(dataset.items):
        raise DatasetError(f"{len(splits)} splits given for {len(dataset.items)} images.")
    assignment = {dataset.item_key(item): split for item, split in zip(dataset.items, splits) if split}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": SPLIT_FILE_VERSION, "kind": dataset.kind, "splits": assignment}, indent=1))
    return path


def apply_split_file(dataset: ImageDataset, split_file: str | os.PathLike) -> None:
    """Re-assign the items' splits from a :func:`write_split_file` JSON file (unlisted items: no split).

    Raises:
        DatasetError: the file is missing or malformed, or names images the dataset does not have.
    """
    path = Path(split_file)
    try:
        data = json.loads(path.read_text())
        assignment = data["splits"]
        if not isinstance(assignment, dict):
            raise TypeError("splits is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"The split file {path} cannot be read ({exc}).") from None
    known = {dataset.item_key(item) for item in dataset.items}
    unknown = sorted(set(assignment) - known)
    if unknown:
        raise DatasetError(f"The split file {path.name} names {len(unknown)} images this dataset does not have "
                           f"(first: {unknown[0]}): it was written for another dataset folder.")
    for item in dataset.items:
        item.split = assignment.get(dataset.item_key(item))
    dataset.notes.append(f"Splits assigned by {path.name}.")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def available_splits(kind: str, root: str | os.PathLike, **options) -> list[str]:
    """The splits a dataset folder provides, in train/val/test order."""
    dataset = open_dataset(kind, root, **options)
    present = {item.split for item in dataset.items if item.split}
    return [name for name in SPLITS if name in present] + sorted(present - set(SPLITS))


# ---------------------------------------------------------------------------------------- covid-ct
CT_CLASSES = ["COVID", "NonCOVID"]
_CT_FOLDERS = {"COVID": "CT_COVID", "NonCOVID": "CT_NonCOVID"}


def _open_covid_ct(root: Path) -> ImageDataset:
    split_dir = root / "Data-split"
    missing = [folder for folder in (*_CT_FOLDERS.values(), "Data-split") if not (root / folder).is_dir()]
    if missing:
        raise DatasetError(
            f"{root} is not a COVID-CT folder: it lacks {', '.join(missing)} "
            "(expected CT_COVID/, CT_NonCOVID/ and Data-split/ as in UCSD-AI4H/COVID-CT)."
        )
    meta = _ct_metadata(root)
    items: list[Item] = []
    raw: list[dict] = []
    notes: list[str] = []
    for label, name in enumerate(CT_CLASSES):
        image_dir = root / _CT_FOLDERS[name]
        for split in SPLITS:
            list_file = split_dir / name / f"{split}CT_{name}.txt"
            if not list_file.is_file():
                continue
            names = [line.strip() for line in list_file.read_text(errors="replace").splitlines() if line.strip()]
            absent = 0
            for file_name in names:
                path = image_dir / file_name
                if not path.is_file():
                    absent += 1
                    continue
                row = meta.get((name, file_name), {})
                patient = row.get("Patient ID") or row.get("patient id")
                items.append(Item(path=path, label=label, patient_id=_clean_id(patient), split=split))
                raw.append(row)
            if absent:
                notes.append(f"{absent} images listed in {list_file.name} were not found and are skipped.")
    if not items:
        raise DatasetError(f"No split lists (e.g. Data-split/COVID/trainCT_COVID.txt) with existing images under {root}.")
    return CovidCTDataset("covid-ct", root, list(CT_CLASSES), None, items, raw, notes)


def _ct_metadata(root: Path) -> dict[tuple[str, str], dict]:
    """Raw metadata rows keyed by (class, file name) from the csv (or xlsx) files, when present."""
    table: dict[tuple[str, str], dict] = {}
    covid = _read_table(root / "COVID-CT-MetaInfo.csv", root / "COVID-CT-MetaInfo.xlsx")
    if covid is not None and "File name" in covid.columns:
        for row in covid.to_dict("records"):
            table[("COVID", str(row["File name"]).strip())] = _tidy_row(row, drop=("File name",))
    noncovid = _read_table(root / "NonCOVID-CT-MetaInfo.csv")
    if noncovid is not None and "image name" in noncovid.columns:
        for row in noncovid.to_dict("records"):
            table[("NonCOVID", str(row["image name"]).strip())] = _tidy_row(row, drop=("image name",))
    return table


def _read_table(*candidates: Path) -> pd.DataFrame | None:
    for path in candidates:
        if not path.is_file():
            continue
        try:
            if path.suffix == ".xlsx":
                return pd.read_excel(path)
            return pd.read_csv(path, encoding_errors="replace")
        except Exception as exc:  # noqa: BLE001 - pandas raises many parser errors
            raise DatasetError(f"The metadata file {path.name} could not be read ({exc}).") from None
    return None


def _tidy_row(row: dict, drop: Sequence[str] = ()) -> dict:
    """Drop unnamed/empty-named columns and NaN values so the metadata frame stays readable."""
    tidy = {}
    for key, value in row.items():
        key = str(key)
        if key in drop or key.startswith("Unnamed") or not key.strip():
            continue
        tidy[key] = None if (isinstance(value, float) and np.isnan(value)) else value
    return tidy


def _clean_id(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


# ------------------------------------------------------------------------------------------ folder
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and any(map(_is_image, p.iterdir())))


def _open_folder(root: Path, val_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    split_dirs = {name: root / name for name in SPLITS if (root / name).is_dir()}
    if split_dirs:
        class_names = sorted({p.name for d in split_dirs.values() for p in _class_folders(d)})
        sources = [(split, d) for split, d in split_dirs.items()]
    else:
        class_names = [p.name for p in _class_folders(root)]
        sources = [(None, root)]
    if len(class_names) < 2:
        raise DatasetError(
            f"{root} needs at least two class sub-folders of images (e.g. Covid/, Normal/), "
            f"optionally under train/ and val/; found {len(class_names)}."
        )
    items: list[Item] = []
    for split, folder in sources:
        for label, name in enumerate(class_names):
            class_dir = folder / name
            if class_dir.is_dir():
                items.extend(Item(path=p, label=label, split=split) for p in sorted(class_dir.iterdir()) if _is_image(p))
    notes: list[str] = []
    if not any(item.split == "val" for item in items):
        # No validation split of its own: carve a seeded, stratified one out of the training images.
        pool = [item for item in items if item.split in (None, "train")]
        val_ids = _stratified_pick([item.label for item in pool], val_fraction, seed)
        for index, item in enumerate(pool):
            item.split = "val" if index in val_ids else "train"
        notes.append(f"Validation split: a seeded ({seed}) stratified {val_fraction:.0%} of the training images.")
    return FolderDataset("folder", root, class_names, None, items, [{} for _ in items], notes)


def _stratified_pick(labels: Sequence[int], fraction: float, seed: int) -> set[int]:
    """Indices of a seeded, per-class ``fraction`` of items (at least one per class of 2+ items)."""
    if not 0 < fraction < 1:
        raise DatasetError(f"The validation fraction must lie between 0 and 1, not {fraction}.")
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label in sorted(set(labels)):
        members = [i for i, value in enumerate(labels) if value == label]
        count = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        chosen.update(int(i) for i in rng.permutation(members)[:count])
    return chosen


# ---------------------------------------------------------------------------------------- ieee8023
IEEE_VIEWS = ("PA", "AP", "AP Supine")
IEEE_CLASSES = ["COVID-19", "No Finding", "viral pneumonia", "other"]
_VIRAL = ("SARS", "MERS", "Influenza", "Varicella", "Herpes", "Viral")


def ieee8023_class(finding: str) -> str | None:
    """Map a metadata ``finding`` to one of :data:`IEEE_CLASSES` (None: unlabelled, skip)."""
    text = str(finding or "").strip()
    if not text or text.lower() in ("todo", "nan", "unknown"):
        return None
    if "COVID-19" in text:
        return "COVID-19"
    if text == "No Finding":
        return "No Finding"
    if any(word.lower() in text.lower() for word in _VIRAL):
        return "viral pneumonia"
    return "other"


def _open_ieee8023(
    root: Path,
    views: Sequence[str] = IEEE_VIEWS,
    class_map: Callable[[str], str | None] | dict | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ImageDataset:
    csv = root / "metadata.csv"
    if not csv.is_file():
        raise DatasetError(f"{root} is not an ieee8023 covid-chestxray-dataset folder: it has no metadata.csv.")
    frame = _read_table(csv)
    needed = {"patientid", "finding", "view", "filename"}
    if frame is None or not needed <= set(frame.columns):
        raise DatasetError(f"{csv} lacks the columns {', '.join(sorted(needed))}.")
    mapper = class_map.get if isinstance(class_map, dict) else (class_map or ieee8023_class)
    if "modality" in frame.columns:
        frame = frame[frame["modality"].fillna("X-ray") == "X-ray"]
    frame = frame[frame["view"].isin(list(views))]
    rows, labels_named, missing = [], [], 0
    for row in frame.to_dict("records"):
        name = mapper(row["finding"])
        if name is None:
            continue
        folder = row.get("folder") if isinstance(row.get("folder"), str) else "images"
        path = root / folder / str(row["filename"])
        if not path.is_file():
            missing += 1
            continue
        rows.append((path, row))
        labels_named.append(name)
    if not rows:
        raise DatasetError(f"No images of views {', '.join(views)} with a usable finding were found under {root}.")
    order = IEEE_CLASSES if class_map is None else []
    classes = [c for c in order if c in labels_named] + sorted(set(labels_named) - set(order))
    patients = [_clean_id(row.get("patientid")) or str(path) for path, row in rows]
    val_patients = _patient_split(patients, [classes.index(n) for n in labels_named], val_fraction, seed)
    items = [
        Item(path=path, label=classes.index(name), patient_id=patient, split="val" if patient in val_patients else "train")
        for (path, _), name, patient in zip(rows, labels_named, patients)
    ]
    raw = [_tidy_row(row, drop=("filename", "patientid")) for _, row in rows]
    notes = [f"Split by patient: a seeded ({seed}) {val_fraction:.0%} of patients form the validation split."]
    if missing:
        notes.append(f"{missing} metadata rows point to image files that are not in the folder; they are skipped.")
    dataset = IEEE8023Dataset("ieee8023", root, classes, None, items, raw, notes)
    dataset.skipped_missing = missing
    return dataset


def _patient_split(patients: Sequence[str], labels: Sequence[int], fraction: float, seed: int) -> set[str]:
    """Patients for validation: seeded, stratified by each patient's most common label."""
    by_patient: dict[str, list[int]] = {}
    for patient, label in zip(patients, labels):
        by_patient.setdefault(patient, []).append(label)
    names = sorted(by_patient)
    majority = [max(set(by_patient[p]), key=by_patient[p].count) for p in names]
    return {names[i] for i in _stratified_pick(majority, fraction, seed)}


_OPENERS = {"covid-ct": _open_covid_ct, "folder": _open_folder, "ieee8023": _open_ieee8023}


# ------------------------------------------------------------------ decoding a split for a model
def load_split_images(dataset: ImageDataset, size: int, window: str | None = None, workers: int | None = None,
                      crop: str | None = None) -> torch.Tensor:
    """Every item of a split prepared by :func:`load_images` (N x 3 x S x S uint8)."""
    if not dataset.items:
        raise DatasetError("The dataset split has no images.")
    return load_images([item.path for item in dataset.items], size, window, workers, crop)


def load_images(paths: Sequence[Path], size: int, window: str | None = None, workers: int | None = None,
                crop: str | None = None) -> torch.Tensor:
    """Decode every file with ``read_image``, crop (the card's ``crop``, see
    :func:`covidscan.preprocessing.model_view`) and resize it like the Predictor does (N x 3 x S x S uint8).

    Raises:
        DatasetError: a file that cannot be read, named.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from covidscan.errors import CovidscanError
    from covidscan.images import read_image
    from covidscan.preprocessing import model_view
    from covidscan.transforms import resize_square, to_tensor

    def load(path: Path):
        try:
            return to_tensor(resize_square(model_view(read_image(path, window=window).pixels, crop), size))
        except CovidscanError as exc:
            raise DatasetError(f"{path.name}: {exc}") from None

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return torch.stack(list(pool.map(load, paths)))


def align_classes(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> list[int]:
    """For each dataset class index, the model's class index (names matched case-insensitively)."""
    lookup = {name.lower(): i for i, name in enumerate(model_classes)}
    missing = [name for name in dataset_classes if name.lower() not in lookup]
    if missing:
        raise DatasetError(
            f"The dataset's classes ({', '.join(dataset_classes)}) do not match the model's "
            f"({', '.join(model_classes)}): {', '.join(missing)} unknown to the model."
        )
    return [lookup[name.lower()] for name in dataset_classes]


def load_split_for(card: ModelCard, dataset: str, root: str | os.PathLike, split: str,
                   dataset_options: dict | None = None, size: int | None = None,
                   ) -> tuple[ImageDataset, np.ndarray, torch.Tensor]:
    """A dataset split prepared for a model: the dataset, true labels in the card's class order, and
    the images at the card's input size (CT DICOMs in the card's window).

    Args:
        card: the :class:`~covidscan.bundle.ModelCard` of the model to run.
        dataset, root, split, dataset_options: see :func:`covidscan.datasets.open_dataset`.
        size: decode at this size instead of the card's input size.
    """
    data = open_dataset(dataset, root, split=split, **(dataset_options or {}))
    mapping = align_classes(data.classes, card.classes)
    y_true = np.array([mapping[label] for label in data.labels()])
    images = load_split_images(data, size or card.input_size, window=card.dicom_window, crop=card.crop)
    return data, y_true, images
