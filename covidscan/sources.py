"""Extra sources: further datasets merged into one, their classes mapped onto its own.

``open_dataset(kind, root, extra_sources=[source_spec(...)])`` adds, e.g., the ieee8023 X-rays to the
Kaggle 3-class folder. Every item keeps its source (reports per source) and, where the source has
them, its patient id (folds group patients per source and near-duplicates across sources).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from covidscan.datasets import DATASET_KINDS, ImageDataset, Item, open_dataset
from covidscan.errors import DatasetError


#: Default class maps of extra sources, by the source's kind: the ieee8023 classes onto the Kaggle
#: 3-class X-ray folder's (Covid / Normal / Viral Pneumonia). "other" (bacterial, fungal, ARDS,
#: lipoid pneumonia ...) has no 3-class counterpart and is dropped; unlabelled rows ("todo") never
#: become items. Only frontal views are read (ieee8023's default ``views``: PA, AP, AP Supine).
DEFAULT_CLASS_MAPS: dict[str, dict[str, str | None]] = {
    "ieee8023": {"COVID-19": "Covid", "No Finding": "Normal", "viral pneumonia": "Viral Pneumonia", "other": None},
}


def source_spec(kind: str, root: str | os.PathLike, class_map: dict[str, str | None] | None = None,
                name: str | None = None, options: dict | None = None) -> dict:
    """An ``extra_sources`` entry, its class map spelled out (the kind's default map where it has one).

    Args:
        kind: the source's layout (one of :data:`DATASET_KINDS`).
        root: its folder.
        class_map: source class -> class of the dataset it joins (None: drop those images); default
            :data:`DEFAULT_CLASS_MAPS` for the kind, else classes of the same name.
        name: how reports name the source (default: its kind).
        options: the source's own ``open_dataset`` options (e.g. ieee8023 ``views``).

    Returns:
        A JSON-ready dict for ``open_dataset(..., extra_sources=[...])``.
    """
    if kind not in DATASET_KINDS:
        raise DatasetError(f"Unknown extra source kind '{kind}'. Choose one of: {', '.join(DATASET_KINDS)}.")
    spec: dict = {"kind": kind, "root": str(root)}
    mapping = class_map if class_map is not None else DEFAULT_CLASS_MAPS.get(kind)
    if mapping is not None:
        spec["class_map"] = dict(mapping)
    if name:
        spec["name"] = name
    if options:
        spec["options"] = dict(options)
    return spec


def parse_source(text: str) -> dict:
    """A ``KIND:FOLDER`` command-line value as a :func:`source_spec` (the kind's default class map)."""
    kind, sep, root = text.partition(":")
    if not sep or not root.strip():
        raise DatasetError(f"An extra source is written KIND:FOLDER (e.g. ieee8023:data/covid-chestxray), not '{text}'.")
    return source_spec(kind.strip(), root.strip())


def _class_mapping(source: ImageDataset, name: str, class_map: dict | None, classes: Sequence[str]) -> dict[str, int | None]:
    """Source class name -> index into ``classes`` (None: dropped); DatasetError for a class that maps nowhere."""
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    if class_map is not None and not isinstance(class_map, dict):
        raise DatasetError(f"The class map of extra source {name} must be an object (source class -> class or null).")
    mapping: dict[str, int | None] = {}
    for source_class in source.classes:
        if class_map is not None and source_class in class_map:
            target = class_map[source_class]
        elif class_map is None and source_class.lower() in lookup:
            target = source_class
        else:
            raise DatasetError(
                f"Class '{source_class}' of extra source {name} maps nowhere: give it a class of the dataset "
                f"({', '.join(classes)}) in the source's class_map, or null to drop its images.")
        if target is not None and str(target).lower() not in lookup:
            raise DatasetError(f"Extra source {name} maps '{source_class}' to '{target}', which is not a class of the "
                               f"dataset ({', '.join(classes)}).")
        mapping[source_class] = None if target is None else lookup[str(target).lower()]
    return mapping


def add_sources(dataset: ImageDataset, specs: Sequence[dict]) -> None:
    """Merge further datasets into ``dataset``, their classes mapped onto its classes (in place).

    Each source keeps its own train/val split (ieee8023: by patient) and patient ids; its items get
    ``source`` set, its raw metadata rows come along, and a note documents the class mapping. Group
    the merged set with :func:`covidscan.folds.dataset_groups`, which joins near-duplicate pictures
    across sources.

    Args:
        dataset: the dataset the sources join (its classes are kept).
        specs: :func:`source_spec` dicts: ``kind``, ``root``, optional ``class_map``, ``name``, ``options``.

    Raises:
        DatasetError: a malformed entry, a missing folder, a class that maps nowhere, or a repeated name.
    """
    if isinstance(specs, dict):
        specs = [specs]
    if len(dataset.raw_metadata) < len(dataset.items):
        dataset.raw_metadata = dataset.raw_metadata + [{} for _ in range(len(dataset.items) - len(dataset.raw_metadata))]
    for spec in specs:
        if not isinstance(spec, dict) or not spec.get("kind") or not spec.get("root"):
            raise DatasetError(f"An extra source needs a kind and a root folder, e.g. "
                               f"{{\"kind\": \"ieee8023\", \"root\": \"data/covid-chestxray\"}}; got {spec!r}.")
        kind, root = spec["kind"], Path(spec["root"]).expanduser()
        name = spec.get("name") or (kind if kind not in dataset.sources else f"{kind}:{root.name}")
        if name in dataset.sources:
            raise DatasetError(f"Two sources are named '{name}': give the extra sources distinct names.")
        options = {k: v for k, v in (spec.get("options") or {}).items() if k not in ("split_file", "extra_sources")}
        try:
            source = open_dataset(kind, root, **options)
        except DatasetError as exc:
            raise DatasetError(f"Extra source {name}: {exc}") from None
        mapping = _class_mapping(source, name, spec.get("class_map"), dataset.classes)
        kept = 0
        for index, item in enumerate(source.items):
            label = mapping[source.classes[item.label]]
            if label is None:
                continue
            dataset.items.append(Item(item.path, label, item.patient_id, item.split, name))
            dataset.raw_metadata.append(source.raw_metadata[index] if index < len(source.raw_metadata) else {})
            kept += 1
        class_map = {c: (None if i is None else dataset.classes[i]) for c, i in mapping.items()}
        dataset.sources[name] = {"kind": kind, "root": root, "class_map": class_map}
        words = ", ".join(f"{c} -> {t}" for c, t in class_map.items() if t) or "nothing"
        dropped = [c for c, t in class_map.items() if t is None]
        dataset.notes.append(f"Extra source {name} ({root.name}): {kept} of {len(source)} images added, classes mapped "
                             f"{words}" + (f"; {', '.join(dropped)} dropped" if dropped else "") + ".")
        dataset.notes.extend(f"{name}: {note}" for note in source.notes)


def describe_sources(**datasets: ImageDataset) -> dict[str, dict]:
    """The sources of one dataset's splits, for a model card: kind, folder name, class map and counts.

    Args:
        **datasets: the splits by name (e.g. ``train=..., val=...``), opened with the same sources.

    Returns:
        ``{source: {"kind", "root", "class_map", "<split>_counts": {class: n}}}``.
    """
    first = next(iter(datasets.values()))
    record = {name: {"kind": info["kind"], "root": Path(info["root"]).name, "class_map": info["class_map"]}
              for name, info in first.sources.items()}
    for split, data in datasets.items():
        for name, counts in data.source_counts().items():
            record.setdefault(name, {})[f"{split}_counts"] = counts
    return record
