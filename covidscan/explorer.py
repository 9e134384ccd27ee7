"""Dataset explorer, metadata part: cleaning, filters, summaries and the data behind its charts.

Pure functions over the metadata table of a dataset (one row per image, as
``covidscan.datasets.ImageDataset.metadata()`` returns it: ``path``, ``filename``, ``label``,
``label_index``, ``split``, ``patient_id`` plus the layout's raw metadata columns). No Streamlit
or Altair here, so everything is testable on small frames and usable from a notebook.

The explorer's other parts: :mod:`covidscan.baselines` (can metadata alone tell the label?),
:mod:`covidscan.leakage` (near-duplicate images, patients in several splits),
:mod:`covidscan.image_stats` (thumbnails, intensity histograms); its charts are drawn on the app
side (``app_pages/charts.py``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covidscan.errors import DatasetError

#: The value that marks a missing category, so "missing" is visible in tables and charts.
MISSING = "missing"

#: Columns every cleaned table has (in this order, first).
CORE_COLUMNS = ("filename", "label", "split", "patient_id", "age", "sex", "severity", "location", "view")

# Raw column names (lower-cased) that hold each standard field, in the layouts we know.
_ALIASES: dict[str, tuple[str, ...]] = {
    "age": ("age",),
    "sex": ("sex", "gender"),
    "severity": ("severity",),
    "location": ("location",),
    "view": ("view", "view_position", "viewposition"),
}

# Columns that must never be baseline features: identifiers, free text, and the label's source.
NOT_FEATURES = {
    "path", "filename", "file name", "image name", "label", "label_index", "split", "patient_id",
    "patientid", "patient id", "finding", "folder", "doi", "url", "license", "clinical_notes",
    "other_notes", "captions", "date", "medical history", "time", "other diseases",
}

SEVERITY_LEVELS = ("asymptomatic", "mild", "moderate", "severe", "critical", "other", MISSING)


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

def parse_age(value: object) -> float:
    """Turn a free-text age into years.

    Args:
        value: e.g. ``65``, ``"41 "``, ``"40+"``, ``"40-50"``, ``"6 months"``, ``"Young Child"``.

    Returns:
        The age in years, or NaN when the text holds no plausible age (0-120 years).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)):
        years = float(value)
    else:
        text = str(value).strip().lower()
        numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]
        if not numbers:
            return float("nan")
        # A range such as "40-50" means its middle; "40+" means at least 40.
        years = (numbers[0] + numbers[1]) / 2 if len(numbers) >= 2 and "-" in text else numbers[0]
        if "month" in text:
            years /= 12
    return years if 0 <= years <= 120 else float("nan")


def normalize_sex(value: object) -> str:
    """Map the spellings of sex used in the datasets to ``"M"``, ``"F"``, ``"other"`` or ``"missing"``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return MISSING
    text = str(value).strip().lower()
    if text in {"", "nan", "na", "n/a", "?", "unknown", "none"}:
        return MISSING
    if text in {"m", "male", "man", "boy"}:
        return "M"
    if text in {"f", "w", "female", "woman", "girl"}:
        return "F"
    return "other"


def normalize_severity(value: object) -> str:
    """Map free-text severity descriptions onto a short ordinal scale.

    Returns:
        One of :data:`SEVERITY_LEVELS`: keyword-matched (``critical`` before ``severe`` before
        ``moderate`` before ``mild``), ``"other"`` for text with no keyword, ``"missing"`` when empty.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return MISSING
    text = str(value).strip().lower()
    if not text or text in {"nan", "na", "?", "unknown"}:
        return MISSING
    if "asymptomatic" in text:
        return "asymptomatic"
    if "critical" in text:
        return "critical"
    if "severe" in text or "serious" in text:
        return "severe"
    if "moderate" in text or "common" in text:
        return "moderate"
    if "mild" in text:
        return "mild"
    return "other"


def _clean_text(value: object) -> str:
    """Trim a category: spaces and trailing dots; empty or NaN becomes ``missing``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return MISSING
    text = re.sub(r"\s+", " ", str(value)).strip().rstrip(".").strip()
    return text if text and text.lower() not in {"nan", "na", "?"} else MISSING


def _find_column(frame: pd.DataFrame, field: str) -> str | None:
    lowered = {str(c).strip().lower(): c for c in frame.columns}
    for alias in _ALIASES[field]:
        if alias in lowered:
            return lowered[alias]
    return None


def clean_metadata(raw: pd.DataFrame) -> pd.DataFrame:
    """Build the cleaned metadata table the explorer shows.

    Adds the standard columns ``age`` (years, float, NaN when unknown), ``sex`` (M/F/other/missing),
    ``severity`` (see :func:`normalize_severity`), ``location`` and ``view`` (trimmed text,
    ``missing`` when empty), puts them first, and keeps the other raw columns after them
    (entirely empty ones are dropped).

    Args:
        raw: one row per image with at least ``path`` and ``label``.

    Returns:
        A new DataFrame; the input is not modified.

    Raises:
        DatasetError: when ``path`` or ``label`` is missing.
    """
    for needed in ("path", "label"):
        if needed not in raw.columns:
            raise DatasetError(f"The dataset's metadata has no '{needed}' column, so it cannot be explored.")
    frame = raw.copy().reset_index(drop=True)
    frame = frame.dropna(axis=1, how="all")
    frame["path"] = frame["path"].astype(str)
    if "filename" not in frame.columns:
        frame["filename"] = [Path(p).name for p in frame["path"]]
    frame["label"] = frame["label"].astype(str)
    frame["split"] = frame["split"].map(_clean_text) if "split" in frame.columns else "all"
    if "patient_id" in frame.columns:
        frame["patient_id"] = frame["patient_id"].map(
            lambda v: None if _clean_text(v) == MISSING else _clean_text(v))
    else:
        frame["patient_id"] = None

    source = {field: _find_column(raw, field) for field in _ALIASES}
    raw_age = frame[source["age"]] if source["age"] else pd.Series([np.nan] * len(frame))
    frame["age_text"] = raw_age.map(lambda v: MISSING if _clean_text(v) == MISSING else str(v).strip())
    frame["age"] = raw_age.map(parse_age).astype(float)
    frame["sex"] = frame[source["sex"]].map(normalize_sex) if source["sex"] else MISSING
    if source["severity"]:
        severity = frame[source["severity"]].map(
            lambda v: np.nan if str(v).strip().lower() == "same as above" else v)
        # "same as above" in COVID-CT repeats the previous row's entry for the same patient.
        if frame["patient_id"].notna().any():
            severity = severity.groupby(frame["patient_id"].fillna("")).ffill()
        frame["severity"] = severity.map(normalize_severity)
    else:
        frame["severity"] = MISSING
    frame["location"] = frame[source["location"]].map(_clean_text) if source["location"] else MISSING
    frame["view"] = frame[source["view"]].map(_clean_text) if source["view"] else MISSING

    replaced = {c for c in source.values() if c and c not in CORE_COLUMNS}
    rest = [c for c in frame.columns if c not in CORE_COLUMNS and c not in replaced
            and c not in ("path", "age_text")]
    ordered = list(CORE_COLUMNS) + ["age_text"] + rest + ["path"]
    frame = frame[ordered]
    for column in ("sex", "severity", "location", "view", "split"):
        frame[column] = frame[column].astype(str)
    return frame


def missing_summary(meta: pd.DataFrame) -> pd.DataFrame:
    """How many values each column lacks (NaN, None, or ``missing``).

    Returns:
        DataFrame with ``column``, ``missing`` (count) and ``missing_pct``, most-missing first.
    """
    rows = []
    for column in meta.columns:
        series = meta[column]
        missing = int(series.isna().sum() + (series.astype(str) == MISSING).sum())
        rows.append({"column": column, "missing": missing,
                     "missing_pct": round(100 * missing / max(len(meta), 1), 1)})
    return pd.DataFrame(rows).sort_values("missing", ascending=False, kind="stable").reset_index(drop=True)


def filter_metadata(
    meta: pd.DataFrame,
    labels: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    sexes: Sequence[str] | None = None,
    age_range: tuple[float, float] | None = None,
    include_unknown_age: bool = True,
) -> pd.DataFrame:
    """Keep the rows that match every given filter (``None`` means "no filter").

    Args:
        meta: a cleaned table from :func:`clean_metadata`.
        labels, splits, sexes: allowed values of ``label``, ``split`` and ``sex``.
        age_range: inclusive (low, high) in years.
        include_unknown_age: keep rows without an age when an age range is given.

    Returns:
        The matching rows (index reset).
    """
    keep = pd.Series(True, index=meta.index)
    if labels is not None:
        keep &= meta["label"].isin(list(labels))
    if splits is not None:
        keep &= meta["split"].isin(list(splits))
    if sexes is not None:
        keep &= meta["sex"].isin(list(sexes))
    if age_range is not None:
        in_range = meta["age"].between(age_range[0], age_range[1])
        keep &= in_range | (meta["age"].isna() if include_unknown_age else False)
    return meta[keep].reset_index(drop=True)


def metadata_csv(meta: pd.DataFrame) -> bytes:
    """The table as UTF-8 CSV bytes, for a download button (paths are left out)."""
    return meta.drop(columns=["path"], errors="ignore").to_csv(index=False).encode("utf-8")


def numeric_columns(meta: pd.DataFrame, min_values: int = 5) -> list[str]:
    """Metadata columns that hold numbers (at least ``min_values`` of them), ``age`` first.

    Identifiers and label columns are left out.
    """
    found = []
    for column in meta.columns:
        if str(column).strip().lower() in NOT_FEATURES or column in ("age_text",):
            continue
        values = pd.to_numeric(meta[column], errors="coerce")
        if values.notna().sum() >= min_values and values.nunique() > 1:
            found.append(column)
    return sorted(found, key=lambda c: c != "age")


# --------------------------------------------------------------------------------------------
# Chart data (the app draws it: app_pages/charts.py)
# --------------------------------------------------------------------------------------------


def class_balance(meta: pd.DataFrame) -> pd.DataFrame:
    """Image counts per split and class: columns ``split``, ``label``, ``images``."""
    return (meta.groupby(["split", "label"], observed=True).size()
            .rename("images").reset_index())


def category_counts(meta: pd.DataFrame, column: str, top_n: int = 10) -> pd.DataFrame:
    """Counts of a categorical column per class; values outside the top N become ``other``.

    Returns:
        Columns ``value``, ``label``, ``images``.
    """
    values = meta[column].astype(str)
    top = values.value_counts().head(top_n).index
    values = values.where(values.isin(top), "other (rest)")
    return (pd.DataFrame({"value": values, "label": meta["label"]})
            .groupby(["value", "label"]).size().rename("images").reset_index())
