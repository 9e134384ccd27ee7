"""Shared Streamlit pieces: the research-use note, the model picker and model-card sidebar, and the
Predict page's per-file analysis with its in-memory result cache.

Importing this module is cheap (no torch): the app's first render must not wait for PyTorch.
The analysis helpers (:func:`analyze_upload`, :func:`case_overlay`) take a Predictor and plain
bytes, so tests can drive them without a browser.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st

from covidscan.errors import CovidscanError
from covidscan.report import RESEARCH_NOTE, card_summary, format_metrics, training_data

if TYPE_CHECKING:
    from covidscan.bundle import ModelCard
    from covidscan.catalog import ModelEntry
    from covidscan.images import LoadedImage
    from covidscan.predictor import Prediction, Predictor

LOG = logging.getLogger(__name__)

#: Session-state key of the model the user picked (shared by every page).
MODEL_KEY = "covidscan_model"
_OTHER_PATH = "Another bundle folder…"
_CASES_KEY = "covidscan_cases"


# ---------------------------------------------------------------- notes


def research_note() -> None:
    """Show the research-use-only note in the current container (every page shows it)."""
    st.warning(f"**Research use only — not for diagnosis.** {RESEARCH_NOTE.split('. ', 1)[1]}", icon=":material/warning:")


# ---------------------------------------------------------------- models


def model_sidebar() -> ModelEntry | None:
    """The model picker and the selected model's card, in the sidebar.

    Returns:
        The chosen model, or None (with a message saying why) when there is none to choose.
    """
    from covidscan.catalog import available_models, model_from_path

    with st.sidebar:
        st.subheader("Model")
        choices = available_models()
        labels = [choice.label for choice in choices] + [_OTHER_PATH]
        picked = st.selectbox("Model", labels, key=MODEL_KEY, label_visibility="collapsed",
                              help="Shipped models, finished training runs, or a bundle folder you name.")
        if picked == _OTHER_PATH:
            typed = st.text_input("Bundle folder", key=f"{MODEL_KEY}_path",
                                  placeholder="/path/to/run/model",
                                  help="A folder with card.json and model.safetensors.")
            if not typed.strip():
                if not choices:
                    st.info("No model is installed yet: name a model bundle folder, or train one on the Train page.")
                return None
            try:
                choice = model_from_path(typed)
            except CovidscanError as exc:
                st.error(str(exc))
                return None
        else:
            choice = choices[labels.index(picked)]
        show_model_card(choice.card, source=choice.source)
        return choice


def show_model_card(card: ModelCard, source: str = "") -> None:
    """The model card, compact: architecture, classes, training data, metrics and their split."""
    st.markdown(f"**{card.name}** · {card.modality}" + (f" · {source}" if source else ""))
    st.caption(f"{card.architecture_label}, {card.input_size} px input · classes: {', '.join(card.classes)}")
    st.caption(f"Training data: {training_data(card)}")
    metric_lines = format_metrics(card.metrics or {}, short=True)
    if metric_lines:
        st.caption("Metrics: " + "  \n".join(metric_lines))
    else:
        st.caption("Metrics: none recorded")
    with st.expander("Full model card"):
        for key, value in card_summary(card):
            st.markdown(f"**{key}:** {value}")
        if card.description:
            st.caption(card.description)


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def load_predictor(path: str, weights_sha256: str) -> Predictor:
    """Load a bundle once per server (``weights_sha256`` makes a retrained bundle load afresh).

    The first Grad-CAM also pays one-off costs (imports, kernel setup); one warm-up explanation
    on a synthetic image moves them here, out of the user's first upload.
    """
    from covidscan.images import ImageInfo, LoadedImage
    from covidscan.predictor import Predictor

    predictor = Predictor(path)
    size = predictor.card.input_size
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1)).astype(np.uint8)
    warm = LoadedImage(np.repeat(ramp[..., None], 3, axis=2),
                       ImageInfo(format="PNG", width=size, height=size, bit_depth=8, color="grayscale"))
    predictor.explain(warm)
    return predictor


# ---------------------------------------------------------------- per-file analysis


@dataclass
class Case:
    """One uploaded file: its image and prediction (computed once), or why it failed.

    ``heatmaps`` caches CAMs by (method, target class), so changing the CAM settings back and
    forth never recomputes, and the opacity only re-blends.
    """

    name: str
    digest: str
    image: LoadedImage | None = None
    prediction: Prediction | None = None
    error: str | None = None
    heatmaps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    preview: np.ndarray | None = None  # the image shrunk for the screen (large X-rays)
    # Encoded pictures for the page, so a rerun re-sends bytes instead of re-encoding every image:
    # (max_side, PNG bytes) of the image, and (settings, JPEG bytes) of the latest overlay.
    image_png: tuple[int | None, bytes] | None = None
    overlay_jpeg: tuple[tuple, str, bytes] | None = None
    # The automatic lung mask (CT models; computed once, None for X-rays) and ROAD results by
    # (method, target class).
    lung_mask: np.ndarray | None = None
    lung_mask_done: bool = False
    faithfulness: dict[tuple[str, str], dict] = field(default_factory=dict)

    @property
    def is_dicom(self) -> bool:
        return self.image is not None and self.image.info.format == "DICOM"


class CaseCache:
    """A small least-recently-used store of analysed files, kept in memory (never on disk)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, Case] = OrderedDict()

    def get(self, key: tuple) -> Case | None:
        case = self._items.get(key)
        if case is not None:
            self._items.move_to_end(key)
        return case

    def put(self, key: tuple, case: Case) -> None:
        self._items[key] = case
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def session_cases(batch_size: int = 0) -> CaseCache:
    """This browser session's cache, grown to hold at least the current batch."""
    cache = st.session_state.get(_CASES_KEY)
    if not isinstance(cache, CaseCache):
        cache = st.session_state[_CASES_KEY] = CaseCache()
    cache.capacity = max(cache.capacity, batch_size)
    return cache


def analyze_upload(
    predictor: Predictor,
    model_id: str,
    name: str,
    data: bytes,
    window: str | None,
    cache: CaseCache,
    method: str = "gradcam",
    target_class: str | None = None,
) -> Case:
    """Read and classify one uploaded file, once per (model, file content, DICOM window).

    The first look runs one Grad-CAM pass, which gives the prediction too; later calls with the
    same file return the cached case without touching the model.

    Args:
        predictor: the loaded model.
        model_id: identifies the model in the cache key (path and weights checksum).
        name: the file's name, for display only.
        data: the file's bytes.
        window: the DICOM window (ignored for other formats), or None for the model's default.
        cache: where analysed files are kept.
        method, target_class: the CAM the page shows first (None: the predicted class).

    Returns:
        The case, with ``error`` set to a readable message when the file cannot be used.
    """
    digest = hashlib.sha256(data).hexdigest()
    key = (model_id, digest, window)
    cached = cache.get(key)
    if cached is not None:
        return cached
    case = Case(name=name, digest=digest)
    try:
        case.image = predictor.load(data, window=window)
        prediction, explanation = predictor.explain(case.image, method=method, target_class=target_class)
        case.prediction = prediction
        case.heatmaps[(method, explanation.target_class)] = explanation.heatmap
    except CovidscanError as exc:
        case.image, case.error = None, str(exc)
    except Exception as exc:  # one odd file must not take down the batch
        LOG.exception("analysis of an uploaded file failed")  # the trace, never the pixels or header
        case.image, case.error = None, f"This file could not be analysed ({type(exc).__name__}). Try another format."
    cache.put(key, case)
    return case


def case_heatmap(predictor: Predictor, case: Case, method: str, target_class: str | None) -> tuple[str, np.ndarray]:
    """The CAM of ``case`` for ``method`` and ``target_class`` (None: the predicted label), cached.

    Returns:
        The class explained and its heatmap (float, [0, 1], at the image's size).
    """
    if case.image is None or case.prediction is None:
        raise CovidscanError(f"{case.name} has no result to explain.")
    target = target_class or case.prediction.label
    key = (method, target)
    if key not in case.heatmaps:
        _, explanation = predictor.explain(case.image, method=method, target_class=target)
        case.heatmaps[key] = explanation.heatmap
    return target, case.heatmaps[key]


def case_lung_mask(predictor: Predictor, case: Case) -> np.ndarray | None:
    """The case's automatic lung mask (CT models), computed once; None for X-ray models or none found."""
    if not case.lung_mask_done:
        mask = predictor.lung_mask(case.image)
        case.lung_mask = mask if mask is not None and mask.any() else None
        case.lung_mask_done = True
    return case.lung_mask


def case_in_lungs(predictor: Predictor, case: Case, method: str, target_class: str | None) -> float | None:
    """The share of the case's CAM inside its lung mask (0..1), or None (X-ray, no lungs found)."""
    from covidscan.lungs import share_inside

    mask = case_lung_mask(predictor, case)
    if mask is None:
        return None
    return share_inside(case_heatmap(predictor, case, method, target_class)[1], mask)


def case_faithfulness(predictor: Predictor, case: Case, method: str, target_class: str | None) -> dict:
    """The ROAD result of the case's CAM (:func:`covidscan.cams.road_faithfulness`), computed once."""
    target, heatmap = case_heatmap(predictor, case, method, target_class)
    key = (method, target)
    if key not in case.faithfulness:
        case.faithfulness[key] = predictor.faithfulness(case.image, heatmap, target)
    return case.faithfulness[key]


def case_overlay(predictor: Predictor, case: Case, method: str, target_class: str | None,
                 opacity: float, max_side: int | None = None, colormap: str = "jet",
                 lung_outline: bool = False) -> tuple[str, np.ndarray]:
    """The overlay image for the current CAM settings; only the blend is redone for a new opacity.

    Args:
        max_side: blend at most this many pixels on the longer side (a screen preview of a large
            X-ray), or None for the image's full size (downloads).
        colormap: the overlay's colour map (:data:`covidscan.cams.COLORMAPS`).
        lung_outline: draw the automatic lung mask's outline (CT models).

    Returns:
        The class explained and the overlay (RGB uint8).
    """
    from covidscan.predictor import overlay_heatmap

    target, heatmap = case_heatmap(predictor, case, method, target_class)
    outline = case_lung_mask(predictor, case) if lung_outline else None
    return target, overlay_heatmap(preview_pixels(case, max_side), heatmap, opacity, colormap, outline)


def image_png(case: Case, max_side: int | None) -> bytes:
    """The case's image (shrunk to ``max_side``) as PNG, encoded once: the scan is shown losslessly."""
    from covidscan.report import png_bytes

    if case.image_png is None or case.image_png[0] != max_side:
        case.image_png = (max_side, png_bytes(preview_pixels(case, max_side)))
    return case.image_png[1]


def overlay_jpeg(predictor: Predictor, case: Case, method: str, target_class: str | None, opacity: float,
                 max_side: int | None, colormap: str = "jet", lung_outline: bool = False) -> tuple[str, bytes]:
    """The overlay for the current settings as JPEG (a colour blend loses nothing that matters),
    encoded once per settings.

    Returns:
        The class explained and the JPEG bytes.
    """
    import io

    from PIL import Image

    settings = (method, target_class or case.prediction.label, round(float(opacity), 4), max_side, colormap,
                lung_outline)
    if case.overlay_jpeg is None or case.overlay_jpeg[0] != settings:
        target, overlay = case_overlay(predictor, case, method, target_class, opacity, max_side, colormap,
                                       lung_outline)
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="JPEG", quality=90)
        case.overlay_jpeg = (settings, target, buffer.getvalue())
    return case.overlay_jpeg[1], case.overlay_jpeg[2]


def preview_pixels(case: Case, max_side: int | None) -> np.ndarray:
    """The case's image shrunk to ``max_side`` on its longer side (kept on the case), or as is."""
    import cv2

    pixels = case.image.pixels
    if max_side is None or max(pixels.shape[:2]) <= max_side:
        return pixels
    if case.preview is None or max(case.preview.shape[:2]) != max_side:
        scale = max_side / max(pixels.shape[:2])
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        case.preview = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return case.preview


def probability_bars(probabilities: dict[str, float], predicted: str) -> None:
    """Per-class probabilities as labelled horizontal bars, highest first, the predicted class in bold.

    Native progress bars rather than a Vega chart: they draw instantly, where a first Vega chart
    costs the browser seconds of script loading on a slow machine.
    """
    for name, probability in sorted(probabilities.items(), key=lambda item: -item[1]):
        label = f"**{name}**" if name == predicted else name
        st.progress(min(max(float(probability), 0.0), 1.0), text=f"{label} — {probability:.1%}")


def show_assessment(prediction) -> None:
    """The answer of a result card: the big label and probabilities, or, for an image the input gate
    flags, a plain 'not assessed' statement with the model's output collapsed behind an expander."""
    from covidscan.gate import FLAGGED_STATEMENT, UNCERTAIN_STATEMENT

    if prediction.flagged:
        st.error(f"**{FLAGGED_STATEMENT}**", icon=":material/block:")
        st.caption(prediction.ood.get("reason") or "")
        with st.expander("Model output anyway (not an assessment)"):
            st.markdown(f"Label: {prediction.label}")
            probability_bars(prediction.probabilities, prediction.label)
        return
    st.markdown(f"### {prediction.label}")
    probability_bars(prediction.probabilities, prediction.label)
    if prediction.uncertain:
        st.info(f"{UNCERTAIN_STATEMENT} Uncertainty {prediction.uncertainty:.2f}.", icon=":material/help:")

