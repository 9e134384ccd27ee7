"""Tests of the lung crop (the card's ``crop``): the box, the model's view in training (SimCLR pretraining too) and prediction,
heatmaps placed back on the whole slice, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import encode, tiny_bundle
from test_lungs import phantom

from covidscan.bundle import ModelCard, read_card
from covidscan.datasets import load_split_images, open_dataset
from covidscan.errors import ModelBundleError, TrainingError
from covidscan.predictor import Predictor
from covidscan.preprocessing import crop_box, model_view, preprocess_array
from covidscan.report import card_summary
from covidscan.training.config import TrainConfig


def test_lung_box_holds_the_lungs_and_drops_the_page_margin():
    image, truth = phantom(320, paper_figure=True)  # the slice sits on a 40 px white page with a caption
    top, bottom, left, right = crop_box(image, "lungs")
    rows, cols = np.flatnonzero(truth.any(axis=1)), np.flatnonzero(truth.any(axis=0))
    assert top <= rows[0] and bottom > rows[-1] and left <= cols[0] and right > cols[-1]
    # Only a small margin around the lungs: the page border and the caption corner are cut away.
    assert top > 40 and left > 40 and bottom < 360 and right < 360
    assert model_view(image, "lungs").shape[:2] == (bottom - top, right - left)
    # A lung mask the caller already has gives the same box, and is what the box is drawn around.
    from covidscan.lungs import lung_mask

    assert crop_box(image, "lungs", lung_mask(image)) == (top, bottom, left, right)
    left_lung = truth.copy()
    left_lung[:, 200:] = False
    assert crop_box(image, "lungs", left_lung)[3] < right


def test_no_crop_or_no_lungs_keeps_the_whole_image():
    image, _ = phantom(200)
    assert crop_box(image, None) is None and model_view(image, None) is image
    blank = np.full((120, 160, 3), 128, np.uint8)  # nothing lung-like: the whole image, not an empty crop
    assert crop_box(blank, "lungs") is None
    with pytest.raises(ValueError, match="Unknown crop"):
        crop_box(image, "heart")


def test_preprocess_and_dataset_decoding_cut_the_same_view(tmp_path):
    image, _ = phantom(256, paper_figure=True)
    cropped = preprocess_array([image], 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop="lungs")
    whole = preprocess_array([image], 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert not np.allclose(cropped, whole)
    folder = tmp_path / "data" / "COVID"
    folder.mkdir(parents=True)
    import cv2

    cv2.imwrite(str(folder / "a.png"), image[..., 0])
    (tmp_path / "data" / "NonCOVID").mkdir()
    cv2.imwrite(str(tmp_path / "data" / "NonCOVID" / "b.png"), image[::-1, :, 0])
    data = open_dataset("folder", tmp_path / "data", split=None)
    decoded = load_split_images(data, 64, crop="lungs")
    index = [item.path.name for item in data.items].index("a.png")
    # Training's uint8 cache, normalised like prediction, is prediction's batch.
    normalised = (decoded[index].float().numpy() / 255 - 0.5) / 0.25
    np.testing.assert_allclose(normalised, cropped[0], atol=1e-5)


def test_predictor_of_a_cropping_model_sees_the_lungs_and_maps_the_heatmap_back(tmp_path):
    image, _ = phantom(256, paper_figure=True)
    predictor = Predictor(tiny_bundle(tmp_path / "ct", crop="lungs"))
    plain = Predictor(tiny_bundle(tmp_path / "plain"))  # the same weights (same seed), whole image
    assert read_card(tmp_path / "ct").crop == "lungs"
    # The sidebar and PDF say what the model looks at; a whole-image model's summary does not.
    assert ("Model input", "the lungs' bounding box (automatic lung mask), not the whole image") in card_summary(predictor.card)
    assert "Model input" not in dict(card_summary(plain.card))
    box = crop_box(image, "lungs")
    with torch.no_grad():
        expected = predictor.probabilities(predictor.model(torch.from_numpy(
            preprocess_array([model_view(image, "lungs")], 64, predictor.card.mean, predictor.card.std))))[0]
    png = encode(image)
    prediction = predictor.predict_one(png)
    np.testing.assert_allclose(list(prediction.probabilities.values()), expected, atol=1e-5)
    assert not np.allclose(list(plain.predict_one(png).probabilities.values()), expected, atol=1e-5)
    _, explanation = predictor.explain(png)
    assert explanation.heatmap.shape == image.shape[:2] and explanation.overlay.shape == image.shape
    top, bottom, left, right = box
    outside = np.ones(image.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert explanation.heatmap[outside].max() == 0 and explanation.heatmap[~outside].max() > 0
    road = predictor.faithfulness(png, explanation.heatmap, explanation.target_class)
    assert road["metric"] == "ROAD" and np.isfinite(road["score"])


def test_crop_is_refused_for_xray_models_and_unknown_names(tmp_path):
    with pytest.raises(ModelBundleError, match="'crop'"):
        ModelCard.for_architecture("x", "tiny_cnn", ["A", "B"], "X-ray", crop="lungs").validate()
    with pytest.raises(ModelBundleError, match="'crop'"):
        ModelCard.for_architecture("x", "tiny_cnn", ["A", "B"], "CT", crop="heart").validate()
    with pytest.raises(TrainingError, match="CT slices only"):
        TrainConfig(dataset="folder", root=str(tmp_path), modality="X-ray", crop="lungs").validate()
    with pytest.raises(TrainingError, match="crop must be one of"):
        TrainConfig(dataset="folder", root=str(tmp_path), modality="CT", crop="heart").validate()


def test_cv_trains_scores_and_ships_on_the_lung_crop(tmp_path):
    """Out-of-fold logits are each fold model's answers for the cropped held-out slices, and the shipped
    ensemble's card says to crop, so prediction sees what training saw."""
    import cv2

    from covidscan.bundle import load_bundle
    from covidscan.cli import main
    from covidscan.oof import OOF_FILE, read_oof_csv
    from covidscan.pretrain import record_path

    root = tmp_path / "data"
    for label, offset in (("COVID", 0), ("NonCOVID", 100)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            image, _ = phantom(160, seed=offset + index, paper_figure=index % 2 == 0)
            cv2.imwrite(str(root / label / f"{label}{index}.png"), image[..., 0] if label == "COVID" else image[..., 0] // 2)
    out = tmp_path / "cv"
    assert main(["cv", "--dataset", "folder", "--root", str(root), "--arch", "tiny_cnn", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "4", "--device", "cpu", "--modality", "CT", "--crop", "lungs",
                 "--folds", "2", "--bootstrap", "100", "--monitor", "last", "--weights-dtype", "float32",
                 "--near-duplicate-distance", "-1",  # the phantoms differ only in noise: keep them apart
                 "--ssl-epochs", "1", "--ssl-batch-size", "4", "--out", str(out)]) == 0
    bundle = load_bundle(out / "model")
    assert bundle.card.crop == "lungs" and bundle.card.input_size == 32
    # Each fold's SimCLR pretraining saw the cropped slices too.
    for fold in (0, 1):
        assert json.loads(record_path(out / "ssl" / f"r0-f{fold}.safetensors").read_text())["config"]["crop"] == "lungs"
    rows, _ = read_oof_csv(out / OOF_FILE)
    assert len(rows) == 12
    for row in rows:
        image = cv2.cvtColor(cv2.imread(str(root / row.path)), cv2.COLOR_BGR2RGB)
        batch = torch.from_numpy(preprocess_array([image], 32, bundle.card.mean, bundle.card.std, crop="lungs"))
        with torch.no_grad():
            logits = bundle.model.members[row.fold](batch)[0].numpy()
        np.testing.assert_allclose(logits, row.logits, atol=1e-4)
    assert main(["cv", "--dataset", "folder", "--root", str(root), "--arch", "tiny_cnn", "--modality", "X-ray",
                 "--crop", "lungs", "--folds", "2", "--out", str(tmp_path / "bad")]) == 2


def test_pretraining_on_the_lung_crop_sees_what_fine_tuning_will(tmp_path):
    """SimCLR with crop="lungs" learns exactly what it learns from the same slices cut by hand."""
    import cv2
    from safetensors.torch import load_file

    from covidscan.pretrain import PretrainConfig, pretrain

    whole, cut_by_hand = tmp_path / "whole", tmp_path / "cut"
    for index in range(6):
        image, _ = phantom(160, seed=index, paper_figure=True)
        label = ("COVID", "NonCOVID")[index % 2]  # labels are ignored; the folder layout wants two classes
        for root, picture in ((whole, image), (cut_by_hand, model_view(image, "lungs"))):
            (root / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / label / f"{index}.png"), picture[..., 0])
    weights = {}
    for name, root, crop in (("cropped", whole, "lungs"), ("by_hand", cut_by_hand, "none"), ("whole", whole, "none")):
        config = PretrainConfig(dataset="folder", root=str(root), split="train+val", arch="tiny_cnn", pretrained=False,
                                epochs=1, image_size=32, batch_size=3, device="cpu", crop=crop)
        assert pretrain(config, tmp_path / f"{name}.safetensors").state == "succeeded"
        weights[name] = load_file(str(tmp_path / f"{name}.safetensors"))
    for key, tensor in weights["cropped"].items():
        torch.testing.assert_close(tensor, weights["by_hand"][key])
    assert any(not torch.equal(tensor, weights["whole"][key]) for key, tensor in weights["cropped"].items())
    with pytest.raises(TrainingError, match="crop must be one of"):
        PretrainConfig(dataset="folder", root=str(whole), crop="heart").validate()
