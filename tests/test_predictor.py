"""Tests for the Predictor: probabilities, decisions, warnings, Grad-CAM, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import ct_dicom_bytes, encode, gradient_image, tiny_bundle

from covidscan.errors import CovidscanError, ImageReadError
from covidscan.images import read_image
from covidscan.predictor import Predictor, overlay_heatmap


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(tiny_bundle(tmp_path_factory.mktemp("m") / "bundle"))


def test_predict_matches_a_manual_forward(predictor):
    image = read_image(encode(gradient_image(120, 90), "PNG"))
    prediction = predictor.predict_one(image)
    from covidscan.transforms import preprocess

    batch = preprocess([image.pixels], 64, predictor.card.mean, predictor.card.std)
    with torch.no_grad():
        expected = torch.softmax(predictor.model(batch), dim=-1)[0].tolist()
    assert list(prediction.probabilities) == ["COVID", "NonCOVID"]
    assert prediction.probabilities["COVID"] == pytest.approx(expected[0], abs=1e-6)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert prediction.label == ["COVID", "NonCOVID"][int(np.argmax(expected))]


def test_batch_equals_one_by_one_and_is_deterministic(predictor):
    images = [encode(gradient_image(100 + 10 * i, 80, seed=i), "PNG") for i in range(3)]
    batch = predictor.predict(images)
    singles = [predictor.predict_one(image) for image in images]
    for a, b in zip(batch, singles):
        assert a.label == b.label
        for name in a.probabilities:
            assert a.probabilities[name] == pytest.approx(b.probabilities[name], abs=1e-5)
    assert [p.probabilities for p in predictor.predict(images)] == [p.probabilities for p in batch]


def test_bad_input_raises_a_clear_error(predictor):
    with pytest.raises(ImageReadError, match="not an image or DICOM"):
        predictor.predict_one(b"definitely not an image" * 20)


def test_threshold_and_temperature_from_the_card(tmp_path):
    low = Predictor(tiny_bundle(tmp_path / "low", positive_class="COVID", threshold=0.01))
    high = Predictor(tiny_bundle(tmp_path / "high", positive_class="COVID", threshold=0.99))
    hot = Predictor(tiny_bundle(tmp_path / "hot", temperature=4.0))
    plain = Predictor(tiny_bundle(tmp_path / "plain"))
    image = encode(gradient_image(), "PNG")
    assert low.predict_one(image).label == "COVID"
    assert high.predict_one(image).label == "NonCOVID"
    p_plain = plain.predict_one(image).probabilities["COVID"]
    p_hot = hot.predict_one(image).probabilities["COVID"]
    assert abs(p_hot - 0.5) < abs(p_plain - 0.5)  # a higher temperature softens the probabilities


def test_modality_mismatch_and_colour_warnings(tmp_path, predictor):
    mr = predictor.predict_one(ct_dicom_bytes(modality="MR"))
    assert any("modality is MR" in w for w in mr.warnings)
    ct = predictor.predict_one(ct_dicom_bytes())
    assert not any("modality" in w for w in ct.warnings)
    xray_model = Predictor(tiny_bundle(tmp_path / "xr", classes=("COVID", "Normal", "Viral Pneumonia"), modality="X-ray"))
    assert any("trained on X-ray" in w for w in xray_model.predict_one(ct_dicom_bytes()).warnings)
    colour = gradient_image()
    colour[..., 0] = 255 - colour[..., 0]
    assert any("colour" in w for w in predictor.predict_one(encode(colour, "PNG")).warnings)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_explain_gives_heatmap_and_overlay_at_original_aspect(predictor, method):
    image = read_image(encode(gradient_image(150, 90), "PNG"))
    prediction, explanation = predictor.explain(image, method=method, target_class="NonCOVID", opacity=0.5)
    assert explanation.heatmap.shape == (90, 150) and explanation.overlay.shape == (90, 150, 3)
    assert explanation.heatmap.dtype == np.float32
    assert 0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1
    assert explanation.target_class == "NonCOVID" and explanation.method == method
    # The CAM pass's own forward gives the same probabilities as a plain prediction.
    plain = predictor.predict_one(image)
    for name in plain.probabilities:
        assert prediction.probabilities[name] == pytest.approx(plain.probabilities[name], abs=1e-5)
    # Deterministic, and the weights stay frozen (no gradients accumulate).
    _, again = predictor.explain(image, method=method, target_class="NonCOVID", opacity=0.5)
    np.testing.assert_array_equal(again.heatmap, explanation.heatmap)
    assert all(p.grad is None for p in predictor.model.parameters())


def test_explain_defaults_to_predicted_class_and_rejects_unknown(predictor):
    prediction, explanation = predictor.explain(encode(gradient_image(), "PNG"))
    assert explanation.target_class == prediction.label
    with pytest.raises(CovidscanError, match="Unknown class 'Flu'"):
        predictor.explain(encode(gradient_image(), "PNG"), target_class="Flu")
    with pytest.raises(CovidscanError, match="Unknown CAM method"):
        predictor.explain(encode(gradient_image(), "PNG"), method="occlusion")


def test_overlay_opacity_blends_without_recomputing():
    pixels = gradient_image(80, 60)
    heatmap = np.zeros((60, 80), np.float32)
    heatmap[:, 40:] = 1.0
    clear = overlay_heatmap(pixels, heatmap, opacity=0.0)
    # pytorch-grad-cam rescales the blend so its maximum is white.
    np.testing.assert_allclose(clear.astype(int), pixels.astype(float) * 255 / pixels.max(), atol=1)
    strong = overlay_heatmap(pixels, heatmap, opacity=1.0)
    assert strong[:, 40:, 0].mean() > 120 and strong[:, :40, 2].mean() > 120  # jet: hot red, cold blue


def test_dicom_window_override(predictor):
    data = ct_dicom_bytes()
    lung = predictor.load(data)
    mediastinum = predictor.load(data, window="mediastinum")
    assert lung.info.window.startswith("lung") and mediastinum.info.window.startswith("mediastinum")
    assert not np.array_equal(lung.pixels, mediastinum.pixels)


def test_one_predictor_serves_many_threads(predictor):
    from concurrent.futures import ThreadPoolExecutor

    images = [read_image(encode(gradient_image(96, 96, seed=seed), "PNG")) for seed in range(6)]
    alone = [predictor.explain(image, method="gradcam++")[1].heatmap for image in images]
    plain = [predictor.predict_one(image).probabilities for image in images]

    def work(index: int):
        # Interleave plain predictions with explanations on the same shared model.
        return predictor.explain(images[index], method="gradcam++")[1].heatmap, predictor.predict_one(images[index])

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(work, range(6)))
    for index, (heatmap, prediction) in enumerate(results):
        np.testing.assert_allclose(heatmap, alone[index], atol=1e-5)
        assert prediction.probabilities == pytest.approx(plain[index], abs=1e-6)
