"""Predict page: upload CT slices, X-rays or DICOM files; see the answer and a Grad-CAM of each.

Each file is read and classified once per (model, content, DICOM window) and kept in this
session's memory; the CAM controls only recompute the heatmap they change, and the opacity only
re-blends. Uploads never touch the disk.
"""
from __future__ import annotations

import streamlit as st

from app_pages import ui
from covidscan.cams import CAM_METHOD_NAMES, CAM_METHODS, COLORMAPS, cam_cost_sentence, faithfulness_sentence
from covidscan.errors import CovidscanError
from covidscan.images import SUPPORTED_TEXT
from covidscan.lungs import outside_lungs_warning
from covidscan.report import CaseOutcome, describe_image, overlay_file_name

UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "gif", "dcm", "dicom", "zip"]  # what read_image reads, and ZIPs of it
WINDOW_NAMES = {"lung": "Lung", "mediastinum": "Mediastinum", "bone": "Bone", "file": "The file's own"}
_WINDOW_KEY = "predict_window"
_UPLOAD_KEY = "predict_uploads"
_BATCH_KEY = "predict_batch"
_REFUSED_KEY = "predict_refused"  # (name, reason) of archive members and archives that were refused
# Longest side of the pictures drawn on the page: sharp on screen, quick to encode and send.
PREVIEW_SIDE = 768

st.title("Predict")
ui.research_note()


def _remember_batch() -> None:
    """Keep the chosen files' bytes in this session's memory, so results survive a visit to another page.

    Streamlit forgets a page's uploader when the user leaves the page; this callback runs only
    when the user changes the selection (adds or removes files), never on a page switch.
    """
    from covidscan.batch import BatchError, is_archive_name, zip_items

    files = st.session_state.get(_UPLOAD_KEY) or []
    batch, refused = [], []
    for upload in files:
        if not is_archive_name(upload.name):
            batch.append((upload.name, upload.getvalue()))
            continue
        try:  # a ZIP stands for the images inside it, read in memory (never extracted to disk)
            members = zip_items(upload.getvalue())
        except BatchError as exc:
            refused.append((upload.name, str(exc)))
            continue
        if not members:
            refused.append((upload.name, "No image or DICOM files were found in this archive."))
        for item in members:
            name = f"{upload.name}/{item.name}"
            if item.error is None:
                batch.append((name, item.data))
            else:
                refused.append((name, item.error))
    st.session_state[_BATCH_KEY] = batch
    st.session_state[_REFUSED_KEY] = refused


st.file_uploader(
    "Chest CT slices, chest X-rays or DICOM files",
    type=UPLOAD_TYPES,
    accept_multiple_files=True,
    key=_UPLOAD_KEY,
    on_change=_remember_batch,
    help=f"{SUPPORTED_TEXT}, or a ZIP of them. Files stay in memory for this session only.",
)
uploads: list[tuple[str, bytes]] = st.session_state.get(_BATCH_KEY) or []
refused: list[tuple[str, str]] = st.session_state.get(_REFUSED_KEY) or []
controls = st.container()
choice = ui.model_sidebar()
if choice is None:
    st.info("No model is available. Install a shipped model in `weights/`, train one on the Train page, "
            "or name a model bundle folder in the sidebar.")
    st.stop()

classes = list(choice.card.classes)
with controls:
    method_col, target_col, opacity_col, window_col = st.columns([1.2, 1.2, 1.4, 1.2])
    method = method_col.selectbox("CAM method", list(CAM_METHOD_NAMES), format_func=CAM_METHOD_NAMES.get,
                                  key="predict_cam_method", help="How the heatmap is computed.")
    method_col.caption(f"{CAM_METHODS[method].description} Cost: {CAM_METHODS[method].cost}.")
    target = target_col.selectbox("Explain class", ["Predicted class", *classes], key="predict_target",
                                  help="Which class the heatmap explains.")
    colormap = target_col.selectbox("Colour map", list(COLORMAPS), format_func=COLORMAPS.get, key="predict_colormap")
    opacity = opacity_col.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key="predict_opacity")
    lung_outline = opacity_col.checkbox("Outline the lungs", key="predict_lung_outline",
                                        help="The automatic lung mask of CT slices (not drawn for X-rays).")
    check_faithfulness = opacity_col.checkbox(
        "Measure faithfulness (ROAD)", key="predict_faithfulness",
        help="Hides the map's hottest and coldest pixels and measures how the class score moves: "
             "a few seconds per image.")
target_class = None if target == "Predicted class" else target
# The window widget is drawn after the files are read (only if one is DICOM); its last value is here.
default_window = choice.card.dicom_window or "file"
window = st.session_state.get(_WINDOW_KEY, default_window)

# Load the model now, while the user is still picking files (once per server: st.cache_resource).
try:
    predictor = ui.load_predictor(str(choice.path), choice.card.weights_sha256)
except CovidscanError as exc:
    st.error(f"The model {choice.card.name} could not be loaded: {exc}", icon=":material/error:")
    st.stop()
if CAM_METHODS[method].slow:  # say what the choice costs with this model before anything is uploaded
    method_col.warning(cam_cost_sentence(method, predictor.cam_forward_passes(method), choice.card.ensemble_size),
                       icon=":material/timer:")
if not uploads and not refused:
    st.caption("Upload one or more files (or a ZIP of them) to see the model's answer and where it looked.")
    st.stop()

model_id = f"{choice.path}:{choice.card.weights_sha256}"
cache = ui.session_cases(batch_size=2 * len(uploads))
progress = st.progress(0.0, text=f"Analysing {len(uploads)} file(s)…") if len(uploads) > 1 else None
cases = []
for done, (name, data) in enumerate(uploads, start=1):
    cases.append(ui.analyze_upload(predictor, model_id, name, data, window, cache, method, target_class))
    if progress is not None:
        progress.progress(done / len(uploads), text=f"Analysed {done} of {len(uploads)} file(s)")
if progress is not None:
    progress.empty()
cases.extend(ui.Case(name=name, digest="", error=reason) for name, reason in refused)

if any(case.is_dicom for case in cases):
    with window_col:
        st.selectbox("DICOM window", list(WINDOW_NAMES), format_func=WINDOW_NAMES.get, key=_WINDOW_KEY,
                     index=list(WINDOW_NAMES).index(window) if window in WINDOW_NAMES else 0,
                     help="How DICOM values map to grey levels (CT in Hounsfield units).")


def show_case(case: ui.Case, index: int) -> None:
    """One result card: image, overlay, label, probabilities, warnings and downloads."""
    with st.container(border=True):
        if case.error is not None:
            st.markdown(f"**{case.name}**")
            st.error(f"{case.name}: {case.error}", icon=":material/error:")
            return
        prediction = case.prediction
        explained, overlay = ui.overlay_jpeg(predictor, case, method, target_class, opacity, PREVIEW_SIDE,
                                             colormap, lung_outline)
        image_col, overlay_col, result_col = st.columns([1, 1, 1.1], gap="medium")
        image_col.image(ui.image_png(case, PREVIEW_SIDE), caption=case.name, width="stretch")
        overlay_col.image(overlay, caption=f"{CAM_METHOD_NAMES[method]} for '{explained}'", width="stretch")
        with result_col:
            st.markdown(f"**{case.name}**")
            ui.show_assessment(prediction)
            for warning in prediction.warnings:
                st.warning(warning, icon=":material/warning:")
            show_checks(case, explained)
            if case.is_dicom:
                summary = " · ".join(f"{key}: {value}" for key, value in describe_image(case.image.info))
                st.caption(f"DICOM (de-identified): {summary}")
            png_col, pdf_col = st.columns(2)
            stem = case.name.rsplit(".", 1)[0]
            png_col.download_button(
                "Overlay PNG", data=lambda: _overlay_png(case, explained), file_name=overlay_file_name(case.name, method),
                mime="image/png", key=f"png_{index}_{case.digest[:12]}", on_click="ignore", icon=":material/download:")
            pdf_col.download_button(
                "PDF report", data=lambda: _case_pdf(case, explained), file_name=f"{stem}_report.pdf",
                mime="application/pdf", key=f"pdf_{index}_{case.digest[:12]}", on_click="ignore", icon=":material/picture_as_pdf:")


def show_checks(case: ui.Case, explained: str) -> None:
    """Whether the map sits in the lungs (CT) and, when asked, how faithful it is (ROAD)."""
    share = ui.case_in_lungs(predictor, case, method, explained)
    if share is not None:
        st.metric("Heatmap inside the lungs", f"{share:.0%}", help="Share of the heatmap's mass inside the "
                  "automatic lung mask. Low values mean the model looked at something else (text, arrows, body).")
        lung_warning = outside_lungs_warning(share)
        if lung_warning:
            st.warning(lung_warning, icon=":material/warning:")
    if check_faithfulness:
        with st.spinner("Measuring faithfulness…"):
            reading = faithfulness_sentence(ui.case_faithfulness(predictor, case, method, explained), explained)
        st.caption(reading)


def _case_checks(case: ui.Case, explained: str) -> dict:
    """The explanation checks for the PDF and CSV (faithfulness only when it was asked for)."""
    road = ui.case_faithfulness(predictor, case, method, explained) if check_faithfulness else None
    return {"cam_in_lungs": ui.case_in_lungs(predictor, case, method, explained), "cam_faithfulness": road}


def _overlay_png(case: ui.Case, explained: str) -> bytes:
    """The full-size overlay, made when the user clicks (the screen shows a preview)."""
    from covidscan.report import png_bytes

    return png_bytes(ui.case_overlay(predictor, case, method, explained, opacity, None, colormap, lung_outline)[1])


def _case_pdf(case: ui.Case, explained: str) -> bytes:
    from covidscan.report import case_report_pdf

    overlay = ui.case_overlay(predictor, case, method, explained, opacity, None, colormap, lung_outline)[1]
    return case_report_pdf(case.name, case.image.pixels, overlay, case.prediction, choice.card,
                           cam_method=method, cam_target=explained, **_case_checks(case, explained))


def _outcome(case: ui.Case) -> CaseOutcome:
    if case.error is not None:
        return CaseOutcome(case.name, None, case.error)
    checks = _case_checks(case, target_class or case.prediction.label)
    road = checks["cam_faithfulness"]
    return CaseOutcome(case.name, case.prediction, None, cam_method=method, cam_in_lungs=checks["cam_in_lungs"],
                       cam_faithfulness=road["score"] if road else None)


def _batch_csv() -> bytes:
    from covidscan.report import results_csv

    outcomes = [_outcome(case) for case in cases]
    return results_csv(outcomes, classes, model_name=choice.card.name, modality=choice.card.modality)


succeeded = sum(case.error is None for case in cases)
summary_col, csv_col = st.columns([3, 1], vertical_alignment="center")
summary_col.markdown(f"**{succeeded} of {len(cases)} file(s) analysed** with {choice.card.name}.")
flagged = sum(case.error is None and case.prediction.flagged for case in cases)
uncertain = sum(case.error is None and not case.prediction.flagged and case.prediction.uncertain for case in cases)
summary_col.caption(f"{flagged} outside what the model was trained on (not assessed) · {uncertain} uncertain")
if not st.session_state.get(_UPLOAD_KEY):
    summary_col.caption("These are the files you uploaded earlier in this session; upload again to replace them.")
    summary_col.button("Clear these results", key="predict_clear", icon=":material/delete:",
                       on_click=lambda: [st.session_state.pop(key, None) for key in (_BATCH_KEY, _REFUSED_KEY)])
csv_col.download_button("Results CSV", data=_batch_csv, file_name="covidscan_results.csv", mime="text/csv",
                        key="batch_csv", on_click="ignore", icon=":material/table_view:", width="stretch")
for number, case in enumerate(cases):
    show_case(case, number)
