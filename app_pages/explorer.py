"""Dataset explorer page: metadata analytics, image grids and leakage checks.

Thin layer: widgets and layout only. The work is done by ``covidscan.explorer`` and
``covidscan.datasets``; results are cached with ``st.cache_data`` and slow steps (hashing and
reading images) run on demand in cached chunks so a progress bar can move between them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app_pages import charts, ui
from covidscan import baselines, explorer, image_stats, leakage
from covidscan.datasets import DATASET_KINDS, open_dataset
from covidscan.errors import CovidscanError

KIND_NAMES = {
    "covid-ct": "COVID-CT folder (CT_COVID/, CT_NonCOVID/, Data-split/)",
    "folder": "Class-per-folder (one sub-folder per class, optional train/ val/)",
    "ieee8023": "ieee8023 covid-chestxray (metadata.csv + images/)",
}
CHUNK = 32  # images per cached step: small enough for a smooth progress bar
GRID_PAGE = 24
PAIRS_WITH_THUMBNAILS = 12
THUMB = 160


# ------------------------------------------------------------------ cached computations
@st.cache_data(show_spinner="Reading the dataset…", max_entries=8)
def load_metadata(kind: str, root: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Cleaned metadata, class names and the loader's notes of one dataset folder."""
    dataset = open_dataset(kind, root)
    return explorer.clean_metadata(dataset.metadata()), list(dataset.classes), list(getattr(dataset, "notes", []))


@st.cache_data(show_spinner=False, max_entries=4096)
def hash_chunk(paths: tuple[str, ...]) -> list[int | None]:
    return leakage.image_hashes(list(paths))


@st.cache_data(show_spinner=False, max_entries=4096)
def histogram_chunk(paths: tuple[str, ...], bins: int) -> list[np.ndarray | None]:
    return [image_stats.image_histogram(p, bins) for p in paths]


@st.cache_data(show_spinner=False, max_entries=2048)
def cached_thumbnail(path: str, size: int) -> np.ndarray:
    return image_stats.thumbnail(path, size)


@st.cache_data(show_spinner="Cross-validating metadata-only models…", max_entries=32)
def cached_baseline(kind: str, root: str, features: tuple[str, ...], folds: int) -> pd.DataFrame:
    meta, _, _ = load_metadata(kind, root)
    return baselines.metadata_baseline(meta, list(features), n_splits=folds)


@st.cache_data(show_spinner="Comparing hashes…", max_entries=32)
def cached_near_duplicates(kind: str, root: str, max_distance: int, include_same: bool) -> tuple[pd.DataFrame, int]:
    """Near-duplicate pairs and the number of unreadable images (hashes come from the chunk cache)."""
    meta, _, _ = load_metadata(kind, root)
    paths = list(meta["path"])
    hashes = [h for start in range(0, len(paths), CHUNK) for h in hash_chunk(tuple(paths[start:start + CHUNK]))]
    return leakage.near_duplicates(meta, hashes, max_distance, include_same), sum(h is None for h in hashes)


def in_chunks(compute: Callable[[tuple[str, ...]], list], paths: Sequence[str], text: str) -> list:
    """Run a cached per-chunk computation over all paths with a progress bar."""
    results: list = []
    bar = st.progress(0.0, text=text)
    for start in range(0, len(paths), CHUNK):
        results.extend(compute(tuple(paths[start:start + CHUNK])))
        done = min(start + CHUNK, len(paths))
        bar.progress(done / max(len(paths), 1), text=f"{text} {done}/{len(paths)}")
    bar.empty()
    return results


def show_chart(chart: alt.TopLevelMixin) -> None:
    st.altair_chart(chart, width="stretch")


def filters_follow(dataset: str, defaults: dict[str, object]) -> bool:
    """Set every filter widget to its default (all classes, splits, ...) when another dataset opens.

    Streamlit keeps a keyed widget's value when its options change, so the class filter of the
    previous dataset would select nothing in the new one. Returns True when filters were reset
    after a switch (not on the first dataset of the session), so the page can say so.
    """
    switched = st.session_state.get("explorer_filters_for") != dataset
    for widget_key, value in defaults.items():
        if switched or widget_key not in st.session_state:
            st.session_state[widget_key] = value
    had_one = st.session_state.get("explorer_filters_for") is not None
    st.session_state["explorer_filters_for"] = dataset
    return switched and had_one


def why_nothing_shown(**selected: Sequence[str]) -> str:
    """Why a filtered table is empty, e.g. "no class is selected" (one reason per empty filter)."""
    empty = [name for name, values in selected.items() if not values]
    if empty:
        return "No image is shown because no " + " and no ".join(empty) + " is selected."
    return "No image matches all of these filters together."


# ------------------------------------------------------------------ page
ui.research_note()
st.title("Dataset explorer")
st.write("Look at a dataset before you train on it: who is in it, how the classes are balanced, "
         "whether metadata alone gives the labels away, and whether the same image sits in two "
         "splits or under two labels.")

with st.form("explorer_open"):
    kind = st.selectbox("Dataset type", DATASET_KINDS, format_func=KIND_NAMES.get, key="explorer_kind")
    root = st.text_input("Dataset folder (a path on the machine that runs the app)", key="explorer_root",
                         placeholder="/data/COVID-CT")
    if st.form_submit_button("Open dataset", type="primary"):
        st.session_state["explorer_source"] = (kind, root.strip())

source = st.session_state.get("explorer_source")
if not source or not source[1]:
    st.info("Choose a dataset type, type the path of its folder and press **Open dataset**.")
    st.stop()

kind, root = source
try:
    meta, classes, notes = load_metadata(kind, root)
except CovidscanError as err:
    st.error(str(err))
    st.stop()
if meta.empty:
    st.warning("This dataset folder holds no images.")
    st.stop()

key = f"{kind}:{root}"  # on-demand results below belong to this dataset only
splits_all = sorted(meta["split"].unique())
sexes_all = sorted(meta["sex"].unique())
age_bounds = (math.floor(meta["age"].min()), math.ceil(meta["age"].max())) if meta["age"].notna().any() else None
numeric = explorer.numeric_columns(meta)
filter_defaults = {"table_classes": classes, "table_splits": splits_all, "table_sexes": sexes_all,
                   "grid_classes": classes, "grid_splits": splits_all, "grid_page": 1,
                   "charts_numeric": numeric[:4], "baseline_features": baselines.baseline_features(meta)}
if age_bounds:
    filter_defaults["table_age"] = age_bounds
if filters_follow(key, filter_defaults):
    st.info("Another dataset is open: the filters now select all of its classes, splits, sexes and ages.",
            icon=":material/filter_alt:")
counts = st.columns(4)
counts[0].metric("Images", len(meta))
counts[1].metric("Classes", len(classes))
counts[2].metric("Splits", meta["split"].nunique())
counts[3].metric("Patients", int(meta["patient_id"].nunique()) if meta["patient_id"].notna().any() else "unknown")
for note in notes:
    st.caption(note)

tab_table, tab_charts, tab_images, tab_baseline, tab_leakage = st.tabs(
    ["Metadata", "Charts", "Images", "Metadata-only baseline", "Leakage check"])

# ------------------------------------------------------------------ metadata table
with tab_table:
    filters = st.columns(4)
    # Values come from session state (see filters_follow), so no default= here.
    labels = filters[0].multiselect("Class", classes, key="table_classes")
    splits = filters[1].multiselect("Split", splits_all, key="table_splits")
    sexes = filters[2].multiselect("Sex", sexes_all, key="table_sexes")
    age_range = None
    if age_bounds and age_bounds[0] < age_bounds[1]:
        age_range = filters[3].slider("Age (years)", *age_bounds, key="table_age")
    filtered = explorer.filter_metadata(meta, labels, splits, sexes, age_range)
    st.write(f"{len(filtered)} of {len(meta)} images. Missing values read `missing` "
             "(an unknown age reads None); `age_text` keeps the age as written.")
    if filtered.empty:
        st.warning(why_nothing_shown(**{"class": labels, "split": splits, "sex": sexes}))
    st.dataframe(filtered.drop(columns=["path", "label_index"], errors="ignore"), hide_index=True, height=360)
    st.download_button("Download CSV", explorer.metadata_csv(filtered), file_name=f"{kind}-metadata.csv",
                       mime="text/csv")
    with st.expander("Missing values per column"):
        st.dataframe(explorer.missing_summary(meta.drop(columns=["path", "label_index"], errors="ignore")),
                     hide_index=True)

# ------------------------------------------------------------------ charts
with tab_charts:
    show_chart(charts.class_balance_chart(meta))
    if meta["age"].notna().any():
        show_chart(charts.age_distribution_chart(meta))
    top_n = st.slider("Locations to show", 3, 30, 10, key="charts_top_n")
    shown = 0
    for column, title, n in (("sex", "Sex per class", 10), ("location", "Location per class (top N)", top_n),
                             ("severity", "Severity per class", 10), ("view", "X-ray view per class", 10)):
        if (meta[column] != explorer.MISSING).any():
            show_chart(charts.category_chart(meta, column, n, title))
            shown += 1
    missing_fields = [c for c in ("age", "sex", "location", "severity", "view")
                      if not ((meta[c].notna() & (meta[c].astype(str) != explorer.MISSING)).any())]
    if missing_fields:
        st.caption(f"Not in this dataset's metadata: {', '.join(missing_fields)}.")
    if numeric:
        st.subheader("Numeric metadata per class")
        picked = st.multiselect("Columns", numeric, key="charts_numeric")
        if len(picked) > 1:  # a one-column "pair plot" is that column's density, drawn just below
            show_chart(charts.pair_plot_chart(meta, picked))
        for column in picked[:4]:
            show_chart(charts.density_chart(meta, column))

# ------------------------------------------------------------------ image grid
with tab_images:
    cols = st.columns(3)
    grid_classes = cols[0].multiselect("Class", classes, key="grid_classes")
    grid_splits = cols[1].multiselect("Split", splits_all, key="grid_splits")
    subset = explorer.filter_metadata(meta, grid_classes, grid_splits)
    pages = max(1, math.ceil(len(subset) / GRID_PAGE))
    if st.session_state.get("grid_page", 1) > pages:  # fewer pages after a filter change
        st.session_state["grid_page"] = pages
    page = cols[2].number_input(f"Page (of {pages})", 1, pages, key="grid_page")
    shown_rows = subset.iloc[(page - 1) * GRID_PAGE: page * GRID_PAGE]
    st.caption(f"{len(subset)} images; showing {len(shown_rows)}.")
    if subset.empty:
        st.warning(why_nothing_shown(**{"class": grid_classes, "split": grid_splits}))
    grid = st.columns(6)
    for i, row in enumerate(shown_rows.itertuples()):
        grid[i % 6].image(cached_thumbnail(row.path, THUMB),
                          caption=f"{row.label} · {row.split} · {row.filename}", width="stretch")

    st.subheader("Pixel-intensity histogram per class")
    per_class = st.slider("Images per class", 10, 300, 50, step=10, key="hist_per_class")
    if st.button("Compute histograms", key="hist_go"):
        st.session_state["hist_for"] = (key, per_class)
    if st.session_state.get("hist_for") == (key, per_class):
        sample = image_stats.sample_per_class(meta, per_class)
        hists = in_chunks(lambda chunk: histogram_chunk(chunk, 32), list(sample["path"]), "Reading images…")
        show_chart(charts.intensity_chart(image_stats.class_histograms(list(sample["label"]), hists)))

# ------------------------------------------------------------------ metadata-only baseline
with tab_baseline:
    st.write("Six classic classifiers learn the label from the metadata alone (never the image), "
             "cross-validated with all images of a patient in the same fold. If they do much better "
             "than the majority-class row, the labels leak through the metadata and an image model "
             "could learn that shortcut instead of the lungs.")
    suggested = baselines.baseline_features(meta)
    candidates = [c for c in meta.columns if c not in ("path", "label", "label_index", "filename")]
    features = st.multiselect("Metadata columns", candidates, key="baseline_features")
    folds = st.slider("Cross-validation folds", 2, 10, 5, key="baseline_folds")
    if not suggested:
        st.info("This dataset has no metadata columns a baseline could learn from.")
    if st.button("Run baseline", key="baseline_go", disabled=not features):
        st.session_state["baseline_for"] = key
    if st.session_state.get("baseline_for") == key and features:
        try:
            scores = cached_baseline(kind, root, tuple(features), folds)
        except CovidscanError as err:
            st.error(str(err))
        else:
            st.dataframe(scores, hide_index=True, column_config={
                c: st.column_config.NumberColumn(format="%.3f") for c in ("accuracy", "accuracy_std", "balanced_accuracy")})
            show_chart(alt.Chart(scores).mark_bar().encode(
                x=alt.X("balanced_accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="balanced accuracy"),
                y=alt.Y("model:N", sort=None), tooltip=["model", "accuracy", "balanced_accuracy"]))
            level, verdict = baselines.baseline_verdict(scores, meta["label"].nunique())
            {"leak": st.warning, "weak": st.info, "none": st.success}[level](verdict)
        gaps = baselines.missingness_by_class(meta, features)
        leaky = gaps[gaps["gap"] >= 50]
        if not leaky.empty:
            st.warning("Some columns are filled in for one class and empty for another, so their mere "
                       f"absence tells the class: {', '.join(leaky['feature'])}.")
        with st.expander("Missing values per class (%)"):
            st.dataframe(gaps, hide_index=True)

# ------------------------------------------------------------------ leakage check
with tab_leakage:
    st.subheader("Patients in more than one split")
    shared_patients = leakage.patients_in_several_splits(meta)
    if meta["patient_id"].isna().all():
        st.info("This dataset has no patient IDs, so patient overlap cannot be checked.")
    elif shared_patients.empty:
        st.success("No patient has images in more than one split.")
    else:
        st.error(f"{len(shared_patients)} patients have images in more than one split.")
        st.dataframe(shared_patients, hide_index=True)

    st.subheader("Near-duplicate images")
    st.write("Every image gets a perceptual hash (pHash); two images whose hashes differ in only a "
             "few of 64 bits show the same picture, even re-saved or resized.")
    cols = st.columns(2)
    max_distance = cols[0].slider("Largest hash distance (bits)", 0, 12, 4, key="leak_distance",
                                  help="0: identical pictures; 4: same picture re-encoded; above 6, "
                                       "different slices start to match.")
    include_same = cols[1].checkbox("Also list duplicates within one split and class", key="leak_same")
    if st.button("Find near-duplicates", key="leak_go"):
        st.session_state["leak_for"] = key
    if st.session_state.get("leak_for") == key:
        in_chunks(hash_chunk, list(meta["path"]), "Hashing images…")  # fills the cache, with progress
        pairs, unreadable = cached_near_duplicates(kind, root, max_distance, include_same)
        if unreadable:
            st.caption(f"{unreadable} images could not be read and were skipped.")
        if pairs.empty:
            st.success("No near-duplicate pairs at this distance.")
        else:
            crossing = int((pairs["kind"] != "same split and class").sum())
            st.error(f"{len(pairs)} near-duplicate pairs ({crossing} across splits or classes).")
            st.dataframe(pairs.drop(columns=["path_a", "path_b"]), hide_index=True, key="leak_table")
            for row in pairs.head(PAIRS_WITH_THUMBNAILS).itertuples():
                left, right, info = st.columns([2, 2, 3])
                left.image(cached_thumbnail(row.path_a, THUMB), caption=f"{row.label_a} · {row.split_a}")
                right.image(cached_thumbnail(row.path_b, THUMB), caption=f"{row.label_b} · {row.split_b}")
                info.write(f"**{row.kind}**, distance {row.distance}  \n{row.filename_a}  \n{row.filename_b}")
