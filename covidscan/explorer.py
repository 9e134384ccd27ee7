"""Dataset explorer: metadata cleaning, charts, metadata-only baselines and leakage checks.

Pure functions over the metadata table of a dataset (one row per image, as
``covidscan.datasets.ImageDataset.metadata()`` returns it: ``path``, ``filename``, ``label``,
``label_index``, ``split``, ``patient_id`` plus the layout's raw metadata columns). No Streamlit
here, so everything is testable on small frames and usable from a notebook.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from covidscan.errors import CovidscanError, DatasetError
from covidscan.images import read_image

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
_NOT_FEATURES = {
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
        if str(column).strip().lower() in _NOT_FEATURES or column in ("age_text",):
            continue
        values = pd.to_numeric(meta[column], errors="coerce")
        if values.notna().sum() >= min_values and values.nunique() > 1:
            found.append(column)
    return sorted(found, key=lambda c: c != "age")


# --------------------------------------------------------------------------------------------
# Charts (Altair). Data is aggregated or sampled here so charts stay small for large datasets.
# --------------------------------------------------------------------------------------------

MAX_CHART_ROWS = 4000


def _sample(frame: pd.DataFrame, limit: int = MAX_CHART_ROWS, seed: int = 0) -> pd.DataFrame:
    return frame.sample(limit, random_state=seed) if len(frame) > limit else frame


def class_balance(meta: pd.DataFrame) -> pd.DataFrame:
    """Image counts per split and class: columns ``split``, ``label``, ``images``."""
    return (meta.groupby(["split", "label"], observed=True).size()
            .rename("images").reset_index())


def class_balance_chart(meta: pd.DataFrame) -> alt.Chart:
    """Grouped bars: number of images of each class in each split."""
    return (alt.Chart(class_balance(meta)).mark_bar()
            .encode(x=alt.X("split:N", title="split"), xOffset="label:N",
                    y=alt.Y("images:Q", title="images"), color=alt.Color("label:N", title="class"),
                    tooltip=["split", "label", "images"])
            .properties(title="Class balance per split", height=260))


def age_distribution_chart(meta: pd.DataFrame, bin_years: int = 5) -> alt.Chart:
    """Overlaid histograms of age per class (images without an age are counted in the title)."""
    known = meta.dropna(subset=["age"])
    binned = known.assign(age_bin=(known["age"] // bin_years) * bin_years)
    counts = binned.groupby(["age_bin", "label"]).size().rename("images").reset_index()
    unknown = int(meta["age"].isna().sum())
    return (alt.Chart(counts).mark_bar(opacity=0.6)
            .encode(x=alt.X("age_bin:Q", bin=alt.Bin(step=bin_years), title="age (years)"),
                    y=alt.Y("images:Q", stack=None), color=alt.Color("label:N", title="class"),
                    tooltip=["label", "age_bin", "images"])
            .properties(title=f"Age per class ({unknown} images without an age)", height=260))


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


def category_chart(meta: pd.DataFrame, column: str, top_n: int = 10, title: str | None = None) -> alt.Chart:
    """Horizontal stacked bars of a categorical column (sex, location, severity, view) per class."""
    counts = category_counts(meta, column, top_n)
    return (alt.Chart(counts).mark_bar()
            .encode(y=alt.Y("value:N", sort="-x", title=column), x=alt.X("images:Q", title="images"),
                    color=alt.Color("label:N", title="class"), tooltip=["value", "label", "images"])
            .properties(title=title or f"{column} per class", height=alt.Step(22)))


def density_chart(meta: pd.DataFrame, column: str) -> alt.Chart:
    """Kernel density of one numeric column per class."""
    data = pd.DataFrame({column: pd.to_numeric(meta[column], errors="coerce"), "label": meta["label"]})
    data = _sample(data.dropna())
    return (alt.Chart(data).transform_density(column, groupby=["label"], as_=[column, "density"])
            .mark_area(opacity=0.45)
            .encode(x=alt.X(f"{column}:Q", scale=alt.Scale(zero=False)),
                    y=alt.Y("density:Q", stack=None),  # overlaid, not stacked: each class integrates to 1
                    color=alt.Color("label:N", title="class"))
            .properties(title=f"{column}: density per class", height=200))


def pair_plot_chart(meta: pd.DataFrame, columns: Sequence[str], cell: int = 140) -> alt.Chart:
    """Scatter matrix of numeric columns coloured by class (densities when only one column).

    Raises:
        DatasetError: when ``columns`` is empty.
    """
    columns = list(columns)
    if not columns:
        raise DatasetError("This dataset has no numeric metadata to plot.")
    if len(columns) == 1:
        return density_chart(meta, columns[0])
    data = meta[list(columns)].apply(pd.to_numeric, errors="coerce").assign(label=meta["label"])
    data = _sample(data)
    return (alt.Chart(data).mark_circle(size=18, opacity=0.6)
            .encode(x=alt.X(alt.repeat("column"), type="quantitative", scale=alt.Scale(zero=False)),
                    y=alt.Y(alt.repeat("row"), type="quantitative", scale=alt.Scale(zero=False)),
                    color=alt.Color("label:N", title="class"))
            .properties(width=cell, height=cell)
            .repeat(row=columns, column=columns))


# --------------------------------------------------------------------------------------------
# Metadata-only baseline
# --------------------------------------------------------------------------------------------

def baseline_features(meta: pd.DataFrame, max_categories: int = 30) -> list[str]:
    """Metadata columns suitable as baseline features.

    Numbers and low-cardinality categories; never identifiers, free text, dates, the split, or the
    column the label came from (any column equal to the label in over 95 % of rows).
    """
    label = meta["label"].astype(str)
    chosen = []
    for column in meta.columns:
        name = str(column).strip().lower()
        if name in _NOT_FEATURES or name in {"age_text", "label_index"} or name.startswith("unnamed"):
            continue
        series = meta[column]
        if series.astype(str).str.lower().eq(label.str.lower()).mean() > 0.95:
            continue
        informative = series.replace(MISSING, np.nan).dropna()
        if informative.nunique() < 2 and series.replace(MISSING, np.nan).notna().all():
            continue
        if informative.empty:
            continue
        numbers = pd.to_numeric(informative, errors="coerce")
        # Numbers, or categories with few enough values to one-hot encode.
        if numbers.notna().mean() > 0.9 or informative.astype(str).nunique() <= max_categories:
            chosen.append(column)
    return chosen


def _baseline_models(seed: int) -> dict[str, object]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    return {
        "Logistic regression": LogisticRegression(max_iter=2000),
        "k-NN (k=5)": KNeighborsClassifier(n_neighbors=5),
        "Decision tree": DecisionTreeClassifier(max_depth=5, random_state=seed),
        "LDA": LinearDiscriminantAnalysis(),
        "Gaussian NB": GaussianNB(),
        "SVM (RBF)": SVC(kernel="rbf", random_state=seed),
    }


def metadata_baseline(
    meta: pd.DataFrame,
    features: Sequence[str] | None = None,
    n_splits: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Cross-validated accuracy of classic classifiers that see only the metadata, never the image.

    Folds are grouped by ``patient_id`` (images of one patient never sit on both sides), and
    stratified by class. A "majority class" row gives the accuracy of always guessing the most
    common class; a model far above it means the labels can be told from metadata alone.

    Args:
        meta: cleaned metadata (one row per image).
        features: columns to use; default :func:`baseline_features`.
        n_splits: number of folds (reduced when there are fewer patients).
        seed: random seed for fold shuffling and the tree/SVM.

    Returns:
        DataFrame with ``model``, ``accuracy``, ``accuracy_std``, ``balanced_accuracy``, ``folds``.

    Raises:
        DatasetError: with no usable feature, a single class, or fewer than two patients.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.dummy import DummyClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import StratifiedGroupKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    # Shuffled rows: ties between identical rows (k-NN) must not follow the file order.
    meta = meta.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    features = list(features) if features is not None else baseline_features(meta)
    if not features:
        raise DatasetError("This dataset has no metadata columns a baseline could learn from.")
    labels = meta["label"].astype(str).to_numpy()
    if len(set(labels)) < 2:
        raise DatasetError("The metadata baseline needs at least two classes.")
    # Images without a patient ID count as their own patient.
    groups = meta["patient_id"].where(meta["patient_id"].notna(), "image:" + meta["path"].astype(str))
    folds = min(n_splits, groups.nunique())
    if folds < 2:
        raise DatasetError("Too few patients to cross-validate a metadata baseline "
                           "(images from at least two patients are needed).")

    data = meta[features].replace(MISSING, np.nan)
    numeric, categorical = [], []
    for column in features:
        as_numbers = pd.to_numeric(data[column], errors="coerce")
        if as_numbers.notna().sum() >= data[column].notna().sum() * 0.9 and as_numbers.notna().any():
            data[column] = as_numbers.astype(float)
            numeric.append(column)
        else:
            data[column] = data[column].astype(object).where(data[column].notna(), MISSING).astype(str)
            categorical.append(column)
    transformers = []
    if numeric:
        # The missing-indicator keeps "value absent" visible to the models: absence can leak labels too.
        transformers.append(("numeric", make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                                                    keep_empty_features=True),
                                                      StandardScaler()), numeric))
    if categorical:
        transformers.append(("categorical", OneHotEncoder(handle_unknown="infrequent_if_exist",
                                                          min_frequency=3, sparse_output=False),
                             categorical))
    prepare = ColumnTransformer(transformers)

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    models = {"Majority class (reference)": DummyClassifier(strategy="most_frequent")}
    models.update(_baseline_models(seed))
    rows = []
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # collinear one-hot columns, tiny folds: expected here
            scores = cross_validate(make_pipeline(prepare, model), data, labels, groups=groups,
                                    cv=splitter, scoring=("accuracy", "balanced_accuracy"),
                                    error_score="raise")
        rows.append({"model": name,
                     "accuracy": float(np.mean(scores["test_accuracy"])),
                     "accuracy_std": float(np.std(scores["test_accuracy"])),
                     "balanced_accuracy": float(np.mean(scores["test_balanced_accuracy"])),
                     "folds": folds})
    return pd.DataFrame(rows)


def baseline_verdict(scores: pd.DataFrame, n_classes: int) -> tuple[str, str]:
    """Say in words what a :func:`metadata_baseline` table means.

    Args:
        scores: the table from :func:`metadata_baseline`.
        n_classes: number of classes (chance balanced accuracy is ``1 / n_classes``).

    Returns:
        ``(level, text)``: level ``"leak"`` (metadata gives the label away), ``"weak"`` (somewhat
        above chance) or ``"none"`` (no better than chance).
    """
    chance = 1 / max(n_classes, 1)
    best = float(scores["balanced_accuracy"].max())
    summary = f"Best balanced accuracy {best:.0%} against {chance:.0%} by chance."
    if best >= 0.8 and best - chance >= 0.3:
        return "leak", (f"{summary} Metadata alone gives the label away: an image model may learn the "
                        "same shortcut. Check for leakage before training.")
    if best - chance >= 0.15:
        return "weak", (f"{summary} Metadata predicts the label somewhat better than chance, "
                        "far from reliably.")
    return "none", f"{summary} Metadata alone predicts the label no better than chance."


def missingness_by_class(meta: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    """Share of missing values of each feature within each class.

    A feature that is filled in for one class and empty for another leaks the label by its
    absence alone (COVID-CT has age and sex only for its COVID images).

    Returns:
        Wide DataFrame: one row per feature, one column per class (percent missing), and ``gap``
        (largest minus smallest), biggest gap first.
    """
    table = {}
    for column in features:
        missing = meta[column].isna() | (meta[column].astype(str) == MISSING)
        table[column] = (missing.groupby(meta["label"]).mean() * 100).round(1)
    frame = pd.DataFrame(table).T
    frame["gap"] = frame.max(axis=1) - frame.min(axis=1)
    return frame.sort_values("gap", ascending=False).rename_axis("feature").reset_index()


# --------------------------------------------------------------------------------------------
# Images: thumbnails, intensity histograms, perceptual hashes
# --------------------------------------------------------------------------------------------

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


def intensity_chart(histograms: pd.DataFrame) -> alt.Chart:
    """Line chart of :func:`intensity_histograms`."""
    return (alt.Chart(histograms).mark_line(interpolate="step-after")
            .encode(x=alt.X("intensity:Q", title="pixel intensity (0-255)"),
                    y=alt.Y("fraction:Q", title="fraction of pixels"),
                    color=alt.Color("label:N", title="class"), tooltip=["label", "intensity", "fraction", "images"])
            .properties(title="Pixel-intensity histogram per class", height=260))


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
