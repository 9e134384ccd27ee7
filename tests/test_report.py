"""covidscan.report: the per-case PDF, the batch CSV, the overlay PNG and the model-card summary."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pypdf import PdfReader
from synthetic import PHI, ct_dicom_bytes, encode, gradient_image, tiny_bundle

from covidscan.predictor import Predictor
from covidscan.report import (
    RESEARCH_NOTE,
    CaseOutcome,
    card_summary,
    case_report_pdf,
    format_metrics,
    overlay_file_name,
    png_bytes,
    results_csv,
)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path = tiny_bundle(tmp_path_factory.mktemp("m") / "ct-tiny", threshold=0.4, positive_class="COVID",
                       metrics={"val": {"accuracy": 0.8125, "auc": 0.9, "n": 48}, "test": {"accuracy": 0.75}},
                       training={"data": "COVID-CT (UCSD-AI4H)", "epochs": 3})
    return Predictor(path)


def _pdf_text(data: bytes) -> str:
    reader = PdfReader(io.BytesIO(data))
    return "\n".join(page.extract_text() for page in reader.pages)


def test_pdf_report_holds_images_answer_card_date_and_note(predictor):
    image = predictor.load(encode(gradient_image(300, 200)))
    prediction, explanation = predictor.explain(image, method="gradcam++")
    created = datetime(2026, 3, 4, 5, 6, tzinfo=timezone.utc)
    data = case_report_pdf("scan_01.png", image.pixels, explanation.overlay, prediction, predictor.card,
                           cam_method="gradcam++", cam_target="COVID", created=created)
    assert data.startswith(b"%PDF-")
    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1
    # The image and the overlay are both embedded as pictures with the image's aspect ratio.
    pictures = reader.pages[0].images
    assert len(pictures) == 2
    for picture in pictures:
        assert picture.image.size == (300, 200)
    text = " ".join(_pdf_text(data).split())
    assert "Research and teaching use only - not a medical device, not for diagnosis." in text
    assert "scan_01.png" in text and "2026-03-04 05:06 UTC" in text
    assert f"Prediction: {prediction.label}" in text
    for name, probability in prediction.probabilities.items():
        assert f"{name} {probability:.1%}" in text
    assert "Grad-CAM++ for 'COVID'" in text
    assert "Training data: COVID-CT (UCSD-AI4H)" in text
    assert "validation: accuracy 0.812 · ROC AUC 0.900 (n=48)" in text and "test: accuracy 0.750" in text
    assert "Decision: COVID when its probability is at least 0.40" in text


def test_pdf_report_of_a_dicom_is_de_identified(predictor):
    image = predictor.load(ct_dicom_bytes())
    prediction, explanation = predictor.explain(image)
    data = case_report_pdf("slice.dcm", image.pixels, explanation.overlay, prediction, predictor.card)
    text = _pdf_text(data)
    assert "Modality: CT" in text and "0.7 × 0.7 mm" in text
    for value in PHI.values():
        assert value.encode() not in data and value not in text


def test_pdf_report_survives_characters_outside_latin1(predictor):
    image = predictor.load(encode(gradient_image(64, 64)))
    prediction, explanation = predictor.explain(image)
    data = case_report_pdf("снимок—лёгкие ✓.png", image.pixels, explanation.overlay, prediction, predictor.card)
    assert "File: ??????-?????? ?.png" in _pdf_text(data)


def test_batch_csv_has_one_row_per_file_in_order(predictor):
    good = predictor.predict_one(encode(gradient_image(96, 96)))
    mr = predictor.predict_one(ct_dicom_bytes(modality="MR"))
    outcomes = [CaseOutcome("a.png", good), CaseOutcome("broken.png", error="The file is empty."),
                CaseOutcome("head.dcm", mr)]
    table = pd.read_csv(io.BytesIO(results_csv(outcomes, predictor.classes, model_name="ct-tiny")))
    assert list(table.columns) == ["file", "label", "p_COVID", "p_NonCOVID", "warnings", "ood_flagged", "ood_score",
                                   "ood_threshold", "ood_reason", "uncertainty", "uncertain", "error", "format",
                                   "modality", "width", "height", "window", "model", "cam_method", "cam_in_lungs",
                                   "cam_faithfulness"]
    assert [str(v) for v in table["ood_flagged"]] == ["False", "nan", "True"]  # the MR DICOM is flagged
    assert "modality is MR" in table.loc[2, "ood_reason"]
    assert table.loc[0, "uncertainty"] == pytest.approx(good.uncertainty, abs=1e-6)
    assert list(table["file"]) == ["a.png", "broken.png", "head.dcm"]
    assert table.loc[0, "label"] == good.label
    assert table.loc[0, "p_COVID"] == pytest.approx(good.probabilities["COVID"], abs=1e-6)
    assert table.loc[0, "p_COVID"] + table.loc[0, "p_NonCOVID"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc[0, "width"] == 96 and table.loc[0, "format"] == "PNG"
    assert table.loc[1, "error"] == "The file is empty." and pd.isna(table.loc[1, "p_COVID"])
    assert table.loc[2, "modality"] == "MR" and "modality is MR" in table.loc[2, "warnings"]
    assert set(table["model"]) == {"ct-tiny"}


def test_png_bytes_round_trip():
    pixels = gradient_image(40, 30)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(pixels))))
    assert decoded.shape == (30, 40, 3) and np.array_equal(decoded, pixels)


def test_card_summary_and_metrics_name_their_split(predictor):
    rows = dict(card_summary(predictor.card))
    assert rows["Architecture"] == "tiny_cnn (64 px input)"
    assert rows["Classes"] == "COVID, NonCOVID"
    assert rows["Metrics"] == "validation: accuracy 0.812 · ROC AUC 0.900 (n=48); test: accuracy 0.750"
    assert format_metrics({}) == []
    assert format_metrics({"val": {"loss": 0.5, "note": "x"}}) == ["validation: loss 0.500"]
    assert "not a medical device" in RESEARCH_NOTE


def test_training_data_reads_what_covidscan_train_records(predictor):
    card = predictor.card
    card_copy = type(card)(**{**card.to_dict(), "training": {
        "dataset": "folder",
        "data": {"root": "/data/covid19-image-dataset-3class", "train_split": "train", "val_split": "val",
                 "train_counts": {"Covid": 83, "Normal": 55}, "val_counts": {"Covid": 21, "Normal": 14}},
    }, "metrics": {"val": {"accuracy": 0.9, "auc": 0.95, "f1": 0.91, "loss": 0.2, "ece": 0.06, "n": 35,
                           "per_class": {"Covid": {"f1": 0.9}}}}})
    rows = dict(card_summary(card_copy))
    assert rows["Training data"] == "covid19-image-dataset-3class (folder): training 138, validation 35 images"
    assert format_metrics(card_copy.metrics, short=True) == ["validation: accuracy 0.900 · ROC AUC 0.950 · F1 0.910 (n=35)"]
    assert rows["Metrics"] == "validation: accuracy 0.900 · ROC AUC 0.950 · F1 0.910 · loss 0.200 · calibration error (ECE) 0.060 (n=35)"


def test_batch_csv_names_the_modality_of_every_read_file(predictor):
    """PNG and JPEG files carry no modality: the CSV names the model's; a DICOM keeps its own."""
    good = predictor.predict_one(encode(gradient_image(96, 96)))
    mr = predictor.predict_one(ct_dicom_bytes(modality="MR"))
    outcomes = [CaseOutcome("a.png", good), CaseOutcome("broken.png", error="The file is empty."),
                CaseOutcome("head.dcm", mr)]
    table = pd.read_csv(io.BytesIO(results_csv(outcomes, predictor.classes, "ct-tiny", modality="CT")),
                        keep_default_na=False)
    assert list(table["modality"]) == ["CT", "", "MR"]


def test_overlay_file_names_spell_the_method_once():
    assert overlay_file_name("scan_01.png", "gradcam++") == "scan_01_gradcampp.png"
    assert overlay_file_name("scan_01.png", "gradcam") == "scan_01_gradcam.png"
    assert overlay_file_name("slice.v2.dcm", "gradcam++") == "slice.v2_gradcampp.png"
    assert overlay_file_name("noextension", "gradcam") == "noextension_gradcam.png"


def test_pdf_report_holds_the_explanation_checks(predictor):
    image = predictor.load(encode(gradient_image(200, 160, seed=4)))
    prediction, explanation = predictor.explain(image, method="eigencam", faithfulness=True)
    data = case_report_pdf("scan_02.png", image.pixels, explanation.overlay, prediction, predictor.card,
                           cam_method="eigencam", cam_target=explanation.target_class, cam_in_lungs=0.3,
                           cam_faithfulness=explanation.faithfulness)
    text = " ".join(_pdf_text(data).split())
    assert f"EigenCAM for '{explanation.target_class}'" in text
    assert "Share of the heatmap inside the lungs: 30%" in text
    assert "The model looked mostly outside the lungs" in text
    assert "Hiding the hottest 20% of the image" in text and "ROAD faithfulness" in text
    plain = " ".join(_pdf_text(case_report_pdf("scan_02.png", image.pixels, explanation.overlay, prediction,
                                               predictor.card)).split())
    assert "Explanation checks" not in plain and "outside the lungs" not in plain


def test_pdf_report_of_a_flagged_image_says_not_assessed(predictor):
    image = predictor.load(ct_dicom_bytes(modality="MR"))
    prediction, explanation = predictor.explain(image)
    assert prediction.flagged
    text = _pdf_text(case_report_pdf("head.dcm", image.pixels, explanation.overlay, prediction, predictor.card))
    assert "Outside what this model was trained on: not assessed." in text
    assert "Prediction:" not in text and "Uncertainty:" in text
