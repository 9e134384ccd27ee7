"""The app's Altair charts: training curves, run reports and the dataset explorer's plots.

Chart builders only: the numbers come from the package (:mod:`covidscan.runs`,
:mod:`covidscan.run_report`, :mod:`covidscan.explorer`, :mod:`covidscan.image_stats`) as plain
DataFrames, so the library never imports Altair. Data is aggregated or sampled before charting
so charts stay small for large datasets.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import altair as alt
import pandas as pd

from covidscan.errors import DatasetError
from covidscan.metric_names import METRIC_NAMES, split_name
from covidscan.explorer import category_counts, class_balance
from covidscan.run_report import RunReport, confusion_frame, misclassified_frame, reliability_frame, roc_frame
from covidscan.runs import lr_finder_frame

if TYPE_CHECKING:
    from covidscan.training import LRFinderResult


# ------------------------------------------------------------------------------- training curves
def _line_chart(frame: pd.DataFrame, title: str, color: str, log_y: bool = False, height: int = 300,
                legend_columns: int = 2) -> alt.Chart:
    scale = alt.Scale(type="log") if log_y else alt.Scale(zero=False)
    # Streamlit fits legend and plot into ``height``: a compact legend above keeps the plot tall.
    return alt.Chart(frame, title=title).mark_line(point=True).encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d"), title="epoch"),
        y=alt.Y("value:Q", scale=scale, title=None),
        color=alt.Color(f"{color}:N", title=None, legend=alt.Legend(orient="top", columns=legend_columns, labelLimit=260,
                                                                   symbolSize=60)),
        tooltip=["run", "epoch", "metric", alt.Tooltip("value:Q", format=".4g")],
    ).properties(height=height)


def loss_chart(curves: pd.DataFrame) -> alt.Chart:
    """Training and validation loss per epoch of one run."""
    return _line_chart(curves[curves["metric"].isin([METRIC_NAMES["train_loss"], METRIC_NAMES["val_loss"]])],
                       "Loss", "metric")


def metric_chart(curves: pd.DataFrame) -> alt.Chart:
    """Validation accuracy, AUC and F1 per epoch of one run."""
    shown = [METRIC_NAMES[key] for key in ("val_accuracy", "val_auc", "val_f1")]
    return _line_chart(curves[curves["metric"].isin(shown)], "Validation metrics", "metric")


def lr_chart(curves: pd.DataFrame) -> alt.Chart:
    """The learning rate at the end of each epoch of one run (log scale)."""
    return _line_chart(curves[curves["metric"] == METRIC_NAMES["lr"]], "Learning rate", "metric", log_y=True)


def comparison_chart(frame: pd.DataFrame, metric: str) -> alt.Chart:
    """One metric (readable name, e.g. "validation AUC") per epoch, one line per run."""
    return _line_chart(frame[frame["metric"] == metric], metric, "run", log_y=metric == METRIC_NAMES["lr"], height=280,
                       legend_columns=1)


def lr_finder_chart(result: LRFinderResult) -> alt.Chart:
    """Loss against learning rate (log x), the suggested learning rate marked by a red rule."""
    frame = lr_finder_frame(result)
    line = alt.Chart(frame, title="Learning-rate range test").mark_line().encode(
        x=alt.X("lr:Q", scale=alt.Scale(type="log"), title="learning rate"),
        y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="smoothed training loss"),
        tooltip=[alt.Tooltip("lr:Q", format=".2e"), alt.Tooltip("loss:Q", format=".4f")],
    )
    if result.suggestion is None:
        return line.properties(height=300)
    mark = pd.DataFrame({"lr": [result.suggestion], "label": [f"suggested {result.suggestion:.1e}"]})
    rule = alt.Chart(mark).mark_rule(color="#c0392b", strokeDash=[4, 3]).encode(x="lr:Q")
    # The label sits inside the plot's top edge: marks outside it would shrink the plot (Streamlit fits the height).
    text = alt.Chart(mark).mark_text(align="left", baseline="top", dx=4, color="#c0392b").encode(
        x="lr:Q", y=alt.value(4), text="label:N")
    return (line + rule + text).properties(height=300)


# ------------------------------------------------------------------------------- run report
def confusion_chart(report: RunReport) -> alt.Chart:
    """A heat-map of the confusion matrix with the counts written in."""
    frame = confusion_frame(report)
    base = alt.Chart(frame, title=f"Confusion matrix ({split_name(report.split)})").encode(
        x=alt.X("predicted:N", sort=report.classes), y=alt.Y("true:N", sort=report.classes))
    cells = base.mark_rect().encode(color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), legend=None),
                                    tooltip=["true", "predicted", "count"])
    middle = float(frame["count"].max()) / 2 if len(frame) else 0.0
    text = base.mark_text(fontSize=16).encode(
        text="count:Q", color=alt.condition(alt.datum.count > middle, alt.value("white"), alt.value("black")))
    return (cells + text).properties(width=260, height=260)


def roc_chart(report: RunReport) -> alt.Chart:
    """ROC curve(s) with the chance diagonal."""
    frame = roc_frame(report)
    auc = report.metrics.get("auc")
    title = "ROC curve" + (f" (AUC {auc:.3f})" if isinstance(auc, (int, float)) else "")
    curve = alt.Chart(frame, title=title).mark_line(interpolate="step-after").encode(
        x=alt.X("fpr:Q", title="1 - specificity", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("tpr:Q", title="sensitivity", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("class:N", legend=alt.Legend(orient="bottom-right", title=None)),
        order=alt.Order("fpr:Q"),
    )
    chance = alt.Chart(pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]})).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="fpr:Q", y="tpr:Q")
    return (chance + curve).properties(width=300, height=280)


def misclassified_chart(report: RunReport) -> alt.Chart:
    """Histogram of the scores the model gave its wrong answers (high = confidently wrong)."""
    frame = misclassified_frame(report)
    return alt.Chart(frame, title=f"Scores of misclassified images ({len(frame)})").mark_bar(color="#c0392b").encode(
        x=alt.X("score:Q", bin=alt.Bin(extent=[0, 1], step=0.05), title="probability of the wrong predicted class"),
        y=alt.Y("count():Q", title="images"),
        tooltip=[alt.Tooltip("count():Q", title="images")],
    ).properties(width=320, height=260)


def reliability_chart(report: RunReport) -> alt.Chart:
    """Reliability diagram: accuracy against mean confidence per confidence bin (point size = images).

    A calibrated model's points lie on the diagonal; below it the model is over-confident.
    """
    frame = reliability_frame(report)
    ece = report.metrics.get("ece")
    title = "Reliability diagram" + (f" (ECE {ece:.3f})" if isinstance(ece, (int, float)) else "")
    # Confidence is the predicted class's probability: never below 1/C, so the axis starts at the chance level.
    low = 1.0 / max(len(report.classes), 2)
    axis = alt.Scale(domain=[low, 1])
    tooltip = ["confidence bin", alt.Tooltip("mean confidence:Q", format=".3f"), alt.Tooltip("accuracy:Q", format=".3f"),
               "images"]
    points = alt.Chart(frame, title=title).mark_line(point=alt.OverlayMarkDef(filled=True), color="#1f77b4").encode(
        x=alt.X("mean confidence:Q", title="confidence (probability of the predicted class)", scale=axis),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])), tooltip=tooltip)
    sized = alt.Chart(frame).mark_circle(color="#1f77b4", opacity=0.35).encode(
        # No size legend: inside the plot it covers the top bins; the tooltip and the bin table give the counts.
        x="mean confidence:Q", y="accuracy:Q", size=alt.Size("images:Q", legend=None), tooltip=tooltip)
    diagonal = alt.Chart(pd.DataFrame({"mean confidence": [low, 1.0], "accuracy": [low, 1.0]})).mark_line(
        strokeDash=[4, 4], color="gray").encode(x="mean confidence:Q", y="accuracy:Q")
    return (diagonal + points + sized).properties(width=320, height=280)


# ------------------------------------------------------------------------------- dataset explorer
MAX_CHART_ROWS = 4000


def _sample(frame: pd.DataFrame, limit: int = MAX_CHART_ROWS, seed: int = 0) -> pd.DataFrame:
    return frame.sample(limit, random_state=seed) if len(frame) > limit else frame


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


def intensity_chart(histograms: pd.DataFrame) -> alt.Chart:
    """Line chart of :func:`intensity_histograms`."""
    return (alt.Chart(histograms).mark_line(interpolate="step-after")
            .encode(x=alt.X("intensity:Q", title="pixel intensity (0-255)"),
                    y=alt.Y("fraction:Q", title="fraction of pixels"),
                    color=alt.Color("label:N", title="class"), tooltip=["label", "intensity", "fraction", "images"])
            .properties(title="Pixel-intensity histogram per class", height=260))
