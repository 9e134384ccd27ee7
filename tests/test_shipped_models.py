"""The bundles shipped in weights/: they load, fit the size limit, and their cards tell the truth."""
from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import encode, gradient_image

from covidscan.bundle import load_bundle
from covidscan.evaluation import evaluate_bundle
from covidscan.predictor import Predictor
from covidscan.catalog import shipped_models

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MAX_BYTES = 20 * 1024 * 1024
# Where each shipped model's validation data lives in ../shared/data, and how its split was made.
VALIDATION = {
    "CT": ("covid-ct", "covid-ct", {}),
    "X-ray": ("folder", "covid19-image-dataset-3class", {"val_fraction": 0.2, "seed": 0}),
}

SHIPPED = shipped_models(REPO / "weights")


def test_one_ct_and_one_xray_model_are_shipped():
    assert sorted(model.card.modality for model in SHIPPED) == ["CT", "X-ray"]


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda m: m.name)
def test_shipped_bundle_loads_predicts_and_is_small_enough(shipped):
    assert sum(f.stat().st_size for f in shipped.path.iterdir()) <= MAX_BYTES
    bundle = load_bundle(shipped.path)  # checks the weights' checksum against the card
    card = bundle.card
    val = card.metrics["val"]
    assert val["n"] > 0 and 0 <= val["accuracy"] <= 1
    assert card.training["command"].startswith("covidscan ")
    prediction = Predictor(bundle).predict_one(encode(gradient_image(256, 256), "PNG"))
    assert set(prediction.probabilities) == set(card.classes)


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda m: m.name)
def test_card_metrics_are_what_evaluate_measures_on_val(shipped):
    kind, folder, options = VALIDATION[shipped.card.modality]
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{SHARED / folder} is absent")
    report = evaluate_bundle(shipped.path, kind, SHARED / folder, split="val", dataset_options=options)
    card_val = shipped.card.metrics["val"]
    assert report["n"] == card_val["n"]
    for key in ("accuracy", "auc", "macro_f1"):
        assert report[key] == pytest.approx(card_val[key], abs=1e-6), key
    assert report["confusion_matrix"] == card_val["confusion_matrix"]
