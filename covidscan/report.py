"""Downloadable results: the per-case PDF report, the batch CSV and the overlay PNG.

Pure functions (no Streamlit), so the app, the CLI and tests share them. Nothing here writes to
disk: every function returns the file's bytes, and the caller decides where they go.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from covidscan.metric_names import metric_name, split_name
from covidscan.cams import CAM_METHOD_NAMES, faithfulness_sentence
from covidscan.lungs import outside_lungs_warning

if TYPE_CHECKING:  # heavy modules (torch) stay out of the import path of the app's first render
    from covidscan.bundle import ModelCard
    from covidscan.predictor import Prediction

RESEARCH_NOTE = (
    "Research and teaching use only — not a medical device, not for diagnosis. "
    "covidscan's answers have not been clinically validated and must never guide the care of a patient."
)
def overlay_file_name(image_name: str, method: str) -> str:
    """The download name of an overlay, e.g. ``"scan_gradcampp.png"`` for ``("scan.png", "gradcam++")``.

    Args:
        image_name: the uploaded file's name (its extension is dropped).
        method: a CAM method key (see :data:`CAM_METHOD_NAMES`); "+" reads "p", other signs are dropped.

    Returns:
        The image's name without extension, an underscore, the method tag and ``.png``.
    """
    stem = image_name.rsplit(".", 1)[0] if "." in image_name else image_name
    tag = "".join(ch for ch in method.replace("+", "p") if ch.isalnum() or ch in "-_")
    return f"{stem}_{tag}.png"
# Longest side of the pictures embedded in the PDF: enough to read, small enough to e-mail.
_PDF_IMAGE_SIDE = 768
# The metrics a card summary lists first, in this order (their names come from covidscan.metric_names).
_METRIC_ORDER = ("accuracy", "auc", "f1", "sensitivity", "specificity", "precision", "recall", "loss")


_HEADLINE_METRICS = ("accuracy", "auc", "f1", "sensitivity", "specificity")


@dataclass
class CaseOutcome:
    """One uploaded file's result for the batch CSV: a prediction, or the reason there is none."""

    file_name: str
    prediction: Prediction | None = None
    error: str | None = None
    cam_method: str | None = None
    cam_in_lungs: float | None = None  # share of the CAM inside the lungs (CT), see covidscan.lungs
    cam_faithfulness: float | None = None  # the ROAD score, see covidscan.cams.road_faithfulness


# ---------------------------------------------------------------- model card summary


def format_metrics(metrics: dict[str, Any], short: bool = False) -> list[str]:
    """One line per split, e.g. ``"validation: accuracy 0.912 · ROC AUC 0.950 (n=120)"``.

    Args:
        metrics: a card's ``metrics``, keyed by split name (``{"val": {"accuracy": ...}}``).
        short: only the headline metrics (accuracy, AUC, F1, sensitivity, specificity).

    Returns:
        Human-readable lines; the number of images is shown as ``n=``; nested details (per-class
        figures, confusion matrices) are left to the full card.
    """
    lines = []
    for split, values in metrics.items():
        if not isinstance(values, dict):
            lines.append(f"{split_name(split)}: {_number(values)}")
            continue
        shown = []
        known = [key for key in _METRIC_ORDER if key in values and (not short or key in _HEADLINE_METRICS)]
        others = [] if short else [key for key in values
                                   if key not in _METRIC_ORDER and key not in ("n", "count", "support", "runs")]
        intervals = values.get("ci95") if isinstance(values.get("ci95"), dict) else {}
        for key in known + others:
            value = values[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown.append(f"{metric_name(key)} {_number(value)}{_interval(intervals.get(key))}")
        count = next((values[k] for k in ("n", "count", "support") if k in values), None)
        notes = ([f"n={count}"] if count is not None else []) + (["95% intervals"] if intervals else [])
        suffix = f" ({'; '.join(notes)})" if notes else ""
        partitions = [part for part in values.get("per_repeat", []) if isinstance(part, dict)]
        name = split_name(split)
        # Several runs joined (covidscan.join): repeat r is run r % runs on fold partition r // runs.
        runs = values.get("runs") if isinstance(values.get("runs"), int) and values.get("runs") > 1 else 1
        if partitions:  # how far the figures move with the fold partition (covidscan.repeats)
            folds_drawn = len(partitions) // runs
            if runs > 1:
                name = (f"{name}, {runs} runs' models" + (f" × {folds_drawn} fold partitions" if folds_drawn > 1 else "")
                        + " averaged")
                alone = "each run" + (" and partition" if folds_drawn > 1 else "") + " alone"
            else:
                name, alone = f"{name}, {folds_drawn} fold partitions averaged", "each partition alone"
            suffix += f"; {alone}: " + " · ".join(
                f"{metric_name(key)} {', '.join(_number(part[key]) for part in partitions)}"
                for key in ("auc", "accuracy") if all(isinstance(part.get(key), float) for part in partitions))
        lines.append(f"{name}: {' · '.join(shown) or 'no numeric metrics'}{suffix}")
    return lines


def _interval(bounds: Any) -> str:
    """`` (lo–hi)`` for a 95% interval given as two numbers, else nothing."""
    if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds):
        return f" ({_number(float(bounds[0]))}–{_number(float(bounds[1]))})"
    return ""


def training_data(card: ModelCard) -> str:
    """What the model was trained on, as the card's training record states it (or "not recorded")."""
    training = card.training or {}
    data = training.get("data")
    if isinstance(data, dict):  # what covidscan train records: root, kind and per-split class counts
        name = Path(str(data.get("root") or training.get("dataset") or "dataset")).name
        kind = training.get("dataset")
        splits = []
        for split in ("train", "val", "test"):
            counts = data.get(f"{split}_counts")
            if isinstance(counts, dict):
                total = sum(v for v in counts.values() if isinstance(v, (int, float)))
                splits.append(f"{split_name(data.get(f'{split}_split') or split)} {int(total)}")
        described = f"{name} ({kind})" if kind and kind != name else name
        return f"{described}: {', '.join(splits)} images" if splits else described
    for key in ("data", "dataset", "datasets", "data_dir", "source"):
        value = training.get(key)
        if value:
            return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return "not recorded"


def card_summary(card: ModelCard) -> list[tuple[str, str]]:
    """The model card as (field, value) rows for the sidebar and the PDF report."""
    rows = [
        ("Model", card.name),
        ("Modality", card.modality),
        ("Architecture", f"{card.architecture_label} ({card.input_size} px input)"),
        ("Classes", ", ".join(card.classes)),
    ]
    if card.threshold is not None and card.positive_class is not None:
        rows.append(("Decision", f"{card.positive_class} when its probability is at least {card.threshold:.2f}"))
    if card.dicom_window:
        rows.append(("DICOM window", str(card.window)))
    if card.crop == "lungs":
        rows.append(("Model input", "the lungs' bounding box (automatic lung mask), not the whole image"))
    rows.append(("Training data", training_data(card)))
    metric_lines = format_metrics(card.metrics or {})
    rows.append(("Metrics", "; ".join(metric_lines) if metric_lines else "none recorded"))
    if card.created:
        rows.append(("Created", card.created))
    return rows


# ---------------------------------------------------------------- image description


def describe_image(info: Any) -> list[tuple[str, str]]:
    """A de-identified description of an input (format, size, and for DICOM modality, spacing, window).

    Args:
        info: an :class:`~covidscan.images.ImageInfo`, which never holds name, ID or birth date.
    """
    if info is None:
        return []
    rows = [("Format", str(info.format)), ("Size", f"{info.width} × {info.height} px, {info.bit_depth}-bit {info.color}")]
    if info.modality:
        rows.append(("Modality", str(info.modality)))
    if info.pixel_spacing:
        row_mm, col_mm = info.pixel_spacing
        rows.append(("Pixel spacing", f"{row_mm:.3g} × {col_mm:.3g} mm"))
    if info.body_part:
        rows.append(("Body part", str(info.body_part)))
    if info.view_position:
        rows.append(("View", str(info.view_position)))
    if info.window:
        rows.append(("Window", str(info.window)))
    return rows


# ---------------------------------------------------------------- files


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an RGB uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def results_table(outcomes: Sequence[CaseOutcome], classes: Sequence[str], model_name: str = "",
                  modality: str = "") -> Any:
    """A pandas DataFrame with one row per file: label, one probability column per class, warnings, error.

    Args:
        outcomes: the batch's results, in upload order.
        classes: the model's classes (the probability columns, ``p_<class>``).
        model_name: written in a ``model`` column so a CSV says where its numbers came from.
        modality: the model's modality (``"CT"``, ``"X-ray"``), written in the ``modality`` column of
            every read file whose own header names none (PNG, JPEG, ...); a DICOM's own modality wins.
    """
    import pandas as pd

    rows = []
    for outcome in outcomes:
        prediction = outcome.prediction
        info = prediction.info if prediction is not None else None
        row: dict[str, Any] = {"file": outcome.file_name, "label": prediction.label if prediction else ""}
        for name in classes:
            probability = prediction.probabilities.get(name) if prediction else None
            row[f"p_{name}"] = round(float(probability), 6) if probability is not None else None
        row.update({
            "warnings": " | ".join(prediction.warnings) if prediction else "",
            **_ood_columns(prediction),
            "error": outcome.error or "",
            "format": info.format if info else "",
            "modality": (info.modality or modality) if info else "",
            "width": info.width if info else None,
            "height": info.height if info else None,
            "window": (info.window or "") if info else "",
            "model": model_name,
            "cam_method": outcome.cam_method or "",
            "cam_in_lungs": None if outcome.cam_in_lungs is None else round(float(outcome.cam_in_lungs), 4),
            "cam_faithfulness": None if outcome.cam_faithfulness is None else round(float(outcome.cam_faithfulness), 4),
        })
        rows.append(row)
    columns = ["file", "label", *[f"p_{name}" for name in classes], "warnings", *OOD_COLUMNS, "error", "format",
               "modality", "width", "height", "window", "model", "cam_method", "cam_in_lungs", "cam_faithfulness"]
    return pd.DataFrame(rows, columns=columns).astype({"width": "Int64", "height": "Int64"})


OOD_COLUMNS = ("ood_flagged", "ood_score", "ood_threshold", "ood_reason", "uncertainty", "uncertain")


def _ood_columns(prediction: Prediction | None) -> dict[str, Any]:
    """The input gate's verdict and the uncertainty as CSV columns (empty for a failed file)."""
    if prediction is None:
        return {name: None for name in OOD_COLUMNS}
    ood = prediction.ood
    return {"ood_flagged": bool(ood.get("flagged")), "ood_score": ood.get("score"), "ood_threshold": ood.get("threshold"),
            "ood_reason": ood.get("reason") or "",
            "uncertainty": None if prediction.uncertainty is None else round(float(prediction.uncertainty), 6),
            "uncertain": bool(prediction.uncertain)}


def results_csv(outcomes: Sequence[CaseOutcome], classes: Sequence[str], model_name: str = "",
                modality: str = "") -> bytes:
    """The batch's results as UTF-8 CSV bytes (see :func:`results_table` for the columns)."""
    return results_table(outcomes, classes, model_name, modality).to_csv(index=False).encode("utf-8")


def case_report_pdf(
    file_name: str,
    pixels: np.ndarray,
    overlay: np.ndarray,
    prediction: Prediction,
    card: ModelCard,
    cam_method: str = "gradcam",
    cam_target: str | None = None,
    created: datetime | None = None,
    cam_in_lungs: float | None = None,
    cam_faithfulness: dict | None = None,
) -> bytes:
    """A one-page PDF for one case: image, CAM overlay, probabilities, warnings, model card, date, note.

    Args:
        file_name: the uploaded file's name (shown as given; the caller chose it).
        pixels: the image as displayed (RGB uint8).
        overlay: the CAM overlay (RGB uint8).
        prediction: the model's answer for the image.
        card: the model card of the model that answered.
        cam_method: a key of :data:`covidscan.cams.CAM_METHODS`.
        cam_target: the class the CAM explains (default: the predicted label).
        created: the report's time (default: now, UTC).
        cam_in_lungs: the share of the CAM inside the automatic lung mask (CT), or None.
        cam_faithfulness: the ROAD result (:func:`covidscan.cams.road_faithfulness`), or None.

    Returns:
        The PDF file's bytes.
    """
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    created = created or datetime.now(timezone.utc)
    pdf = FPDF(format="A4")
    pdf.set_title("covidscan case report")
    pdf.set_creator("covidscan")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_image_filter("DCTDecode")  # JPEG inside the PDF: a tenth of the size of Flate for photos
    pdf.add_page()
    width = pdf.epw

    def line(text: str, size: float = 10, style: str = "", height: float = 5.5) -> None:
        pdf.set_font("Helvetica", style, size)
        pdf.multi_cell(width, height, _latin1(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    line("covidscan case report", size=17, style="B", height=9)
    pdf.set_text_color(160, 0, 0)
    line(RESEARCH_NOTE, size=9, style="B", height=4.5)
    pdf.set_text_color(0, 0, 0)
    line(f"File: {file_name}    Report created: {created.strftime('%Y-%m-%d %H:%M UTC')}", size=9)
    pdf.ln(2)

    # The image and its overlay side by side, scaled to the same box.
    gap = 6.0
    box = (width - gap) / 2
    top = pdf.get_y()
    target = cam_target or prediction.label
    method = CAM_METHOD_NAMES.get(cam_method, cam_method)
    heights = []
    for index, (array, caption) in enumerate(((pixels, "Image"), (overlay, f"{method} for '{target}'"))):
        picture = _shrink(array)
        scale = min(box / picture.width, 90.0 / picture.height)
        w, h = picture.width * scale, picture.height * scale
        x = pdf.l_margin + index * (box + gap)
        pdf.image(picture, x=x, y=top, w=w, h=h)
        pdf.set_xy(x, top + h + 1)
        pdf.set_font("Helvetica", "", 8)
        pdf.cell(box, 4, _latin1(caption))
        heights.append(h)
    pdf.set_xy(pdf.l_margin, top + max(heights) + 7)

    if prediction.flagged:
        from covidscan.gate import FLAGGED_STATEMENT

        line(FLAGGED_STATEMENT, size=13, style="B", height=7)
        line(f"Why: {prediction.ood.get('reason') or ''}", size=9, height=4.5)
        line(f"Model output, not an assessment: {prediction.label}", size=10, height=5.5)
    else:
        line(f"Prediction: {prediction.label}", size=13, style="B", height=7)
    if prediction.uncertainty is not None:
        from covidscan.gate import UNCERTAIN_STATEMENT

        note = f" - {UNCERTAIN_STATEMENT}" if prediction.uncertain else ""
        line(f"Uncertainty: {prediction.uncertainty:.2f} (0 = sure, 1 = no idea){note}", size=9, height=4.5)
    pdf.set_font("Helvetica", "", 10)
    with pdf.table(col_widths=(60, 30), width=90, align="LEFT", line_height=5.5,
                   text_align=("LEFT", "RIGHT")) as table:
        table.row(["Class", "Probability"])
        for name, probability in sorted(prediction.probabilities.items(), key=lambda item: -item[1]):
            table.row([_latin1(name), f"{probability:.1%}"])
    pdf.ln(2)
    explanation_lines = []
    if cam_in_lungs is not None:
        explanation_lines.append(f"Share of the heatmap inside the lungs: {cam_in_lungs:.0%} (automatic lung mask).")
    reading = faithfulness_sentence(cam_faithfulness, target)
    if reading:
        explanation_lines.append(reading)
    warnings = list(prediction.warnings)
    lung_warning = outside_lungs_warning(cam_in_lungs)
    if lung_warning and lung_warning not in warnings:
        warnings.append(lung_warning)
    for heading, items in (("Explanation checks", explanation_lines), ("Warnings", warnings)):
        if items:
            line(heading, size=11, style="B", height=6)
            for text in items:
                line(f"- {text}", size=9, height=4.5)
            pdf.ln(1)
    image_rows = describe_image(prediction.info)
    if image_rows:
        line("Input (de-identified)", size=11, style="B", height=6)
        line("; ".join(f"{key}: {value}" for key, value in image_rows), size=9, height=4.5)
        pdf.ln(1)
    line("Model card", size=11, style="B", height=6)
    for key, value in card_summary(card):
        line(f"{key}: {value}", size=9, height=4.5)
    if card.description:
        line(card.description, size=9, height=4.5)
    return bytes(pdf.output())


def _shrink(array: np.ndarray) -> Image.Image:
    picture = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    picture.thumbnail((_PDF_IMAGE_SIDE, _PDF_IMAGE_SIDE))
    return picture


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# The PDF core fonts speak Latin-1 only; map the typography we use and replace anything else.
_LATIN1_SUBSTITUTES = {"—": "-", "–": "-", "’": "'", "‘": "'", "“": '"', "”": '"',
                       "…": "...", "≥": ">=", "≤": "<="}


def _latin1(text: str) -> str:
    for char, substitute in _LATIN1_SUBSTITUTES.items():
        text = text.replace(char, substitute)
    return text.encode("latin-1", errors="replace").decode("latin-1")
