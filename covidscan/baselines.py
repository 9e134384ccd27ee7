"""Metadata-only baselines: can the label be told from the metadata alone, without the image?

Classic classifiers cross-validated on a dataset's cleaned metadata (see
:func:`covidscan.explorer.clean_metadata`), folds grouped by patient. A model far above the
majority class means an image model may learn the same shortcut. scikit-learn is imported
only when a baseline runs.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from covidscan.errors import DatasetError
from covidscan.explorer import MISSING, NOT_FEATURES


def baseline_features(meta: pd.DataFrame, max_categories: int = 30) -> list[str]:
    """Metadata columns suitable as baseline features.

    Numbers and low-cardinality categories; never identifiers, free text, dates, the split, or the
    column the label came from (any column equal to the label in over 95 % of rows).
    """
    label = meta["label"].astype(str)
    chosen = []
    for column in meta.columns:
        name = str(column).strip().lower()
        if name in NOT_FEATURES or name in {"age_text", "label_index"} or name.startswith("unnamed"):
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

