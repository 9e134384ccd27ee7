"""Tests of the CAM registry (every method on a tiny model and on the shipped CT ensemble), colour maps
and ROAD faithfulness on a model whose evidence is known."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import encode, gradient_image, tiny_bundle

from covidscan.cams import (
    CAM_METHODS,
    COLORMAPS,
    cam_cost_sentence,
    cam_method,
    faithfulness_sentence,
    record_fields,
    road_faithfulness,
)
from covidscan.catalog import shipped_models
from covidscan.errors import CovidscanError
from covidscan.predictor import Predictor, overlay_heatmap

REPO = Path(__file__).resolve().parents[1]
# A shipped ensemble (both shipped models are ensembles of fold models).
SHIPPED_ENSEMBLE = next((m.path for m in shipped_models(REPO / "weights") if m.card.ensemble_size > 1), None)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(tiny_bundle(tmp_path_factory.mktemp("cams") / "bundle"))


def _check_map(explanation, width: int, height: int) -> None:
    heatmap = explanation.heatmap
    assert heatmap.shape == (height, width) and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert heatmap.max() > 0.5  # pytorch-grad-cam scales each map to [0, 1]: something is hot
    assert explanation.overlay.shape == (height, width, 3) and explanation.overlay.dtype == np.uint8


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_explains_the_tiny_model(predictor, method):
    image = encode(gradient_image(120, 90), "PNG")
    prediction, explanation = predictor.explain(image, method=method, target_class="COVID")
    _check_map(explanation, 120, 90)
    assert explanation.method == method and explanation.target_class == "COVID"
    # The probabilities come from the same pass, and match a plain prediction.
    plain = predictor.predict_one(image)
    assert prediction.probabilities["COVID"] == pytest.approx(plain.probabilities["COVID"], abs=1e-5)
    fields = record_fields(explanation)
    assert fields["cam_method"] == method and fields["cam_faithfulness"] is None


def test_methods_differ_and_gradient_free_ones_need_no_gradients(predictor):
    image = encode(gradient_image(96, 96, seed=3), "PNG")
    grad = predictor.explain(image, method="gradcam")[1].heatmap
    eigen = predictor.explain(image, method="eigencam")[1].heatmap
    assert not np.allclose(grad, eigen, atol=1e-3)
    with torch.no_grad():  # EigenCAM and ScoreCAM never call backward
        for method in ("eigencam", "scorecam"):
            _check_map(predictor.explain(image, method=method)[1], 96, 96)


def test_registry_entries_are_complete_and_unknown_names_are_clear():
    assert {"gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam", "ablationcam",
            "xgradcam"} <= set(CAM_METHODS)
    for key, method in CAM_METHODS.items():
        assert method.key == key and method.display and method.description.endswith(".") and method.cost
    assert CAM_METHODS["scorecam"].slow and not CAM_METHODS["eigencam"].slow and not CAM_METHODS["gradcam"].slow
    with pytest.raises(CovidscanError, match="Unknown CAM method 'occlusion'.*gradcam"):
        cam_method("occlusion")


def _tiny_ensemble(**card_changes) -> Predictor:
    """A Predictor over an ensemble of two tiny_cnn models (seeds 0 and 1), its card changed by ``card_changes``."""
    from covidscan.bundle import Bundle, load_bundle
    from covidscan.models import Ensemble

    with tempfile.TemporaryDirectory() as folder:
        members = [load_bundle(tiny_bundle(Path(folder) / f"m{seed}", seed=seed)) for seed in (0, 1)]
    card = dataclasses.replace(members[0].card, **card_changes)
    return Predictor(Bundle(Ensemble([m.model for m in members]).eval(), card, Path(folder)))


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_explains_an_ensemble_of_tiny_models(method):
    ensemble = _tiny_ensemble()
    assert len(ensemble._target_layers) == 2
    prediction, explanation = ensemble.explain(encode(gradient_image(72, 64, seed=2), "PNG"), method=method)
    _check_map(explanation, 72, 64)
    plain = ensemble.predict_one(encode(gradient_image(72, 64, seed=2), "PNG"))
    assert prediction.probabilities["COVID"] == pytest.approx(plain.probabilities["COVID"], abs=1e-5)


def test_forward_pass_counts_are_what_each_method_runs():
    """The cost the Predict page quotes for a method is the number of images it actually puts through
    the networks of a 2-member ensemble (counted on every member)."""
    ensemble = _tiny_ensemble()
    images = []
    hooks = [member.register_forward_hook(lambda module, args, output: images.append(len(args[0])))
             for member in ensemble.model.members]
    try:
        for method in CAM_METHODS:
            images.clear()
            ensemble.explain(encode(gradient_image(72, 64, seed=2), "PNG"), method=method)
            assert ensemble.cam_forward_passes(method) == sum(images), method
    finally:
        for hook in hooks:
            hook.remove()
    # ScoreCAM member by member: each member once for the prediction, once more and once per feature map
    # of its target layer for its map.
    widths = []
    hooks = [layer.register_forward_hook(lambda module, args, output: widths.append(output.shape[1]))
             for layer in ensemble._target_layers]
    with torch.no_grad():
        ensemble.model(torch.zeros(1, 3, ensemble.card.input_size, ensemble.card.input_size))
    for hook in hooks:
        hook.remove()
    slow = ensemble.cam_forward_passes("scorecam")
    assert len(widths) == 2 and slow == 2 * 2 + sum(widths)
    assert ensemble.cam_forward_passes("gradcam") == 2
    assert cam_cost_sentence("scorecam", slow, 2) == (
        f"Score-CAM runs this model's 2 networks {slow:,} times per image (once per feature map): minutes "
        "per image on a CPU. Grad-CAM runs each once.")
    assert cam_cost_sentence("gradcam", 1) == "Grad-CAM runs this model once per image."


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_per_feature_map_methods_explain_an_ensemble_member_by_member(method):
    """An ensemble's Score-CAM / Ablation-CAM map is its members' own maps of the ensemble's class,
    averaged and rescaled: computed here with pytorch-grad-cam on each member directly."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from covidscan.models import target_layer

    # Same-sized input and image, no crop: the map comes back at the input's size unchanged.
    ensemble = _tiny_ensemble(input_size=64)
    card = ensemble.card
    image = encode(gradient_image(64, 64, seed=5), "PNG")
    prediction, explanation = ensemble.explain(image, method=method)
    batch = ensemble._batch(ensemble.load(image), None)
    target = [ClassifierOutputTarget(ensemble.classes.index(prediction.label))]
    own = []
    for member in ensemble.model.members:
        with CAM_METHODS[method].build(member, [target_layer(member, card.architecture)]) as cam:
            own.append(cam(input_tensor=batch, targets=target)[0])
    expected = scale_cam_image(np.mean(own, axis=0)[None])[0]
    np.testing.assert_allclose(explanation.heatmap, expected, atol=1e-4)
    assert not np.allclose(own[0], own[1], atol=1e-3)  # the members' maps differ: the mean is of both
    assert prediction.probabilities == ensemble.predict_one(image).probabilities


@pytest.mark.skipif(SHIPPED_ENSEMBLE is None, reason="no shipped model is an ensemble")
@pytest.mark.parametrize("method", [pytest.param(key, marks=pytest.mark.slow) if spec.slow else key
                                    for key, spec in CAM_METHODS.items()])
def test_every_method_explains_the_shipped_ensemble(method):
    shipped = Predictor(SHIPPED_ENSEMBLE)
    assert len(shipped._target_layers) == shipped.card.ensemble_size  # one target layer per ensemble member
    # A small input keeps the many-forward methods (ScoreCAM, AblationCAM) quick in a test.
    shipped.card = dataclasses.replace(shipped.card, input_size=64)
    prediction, explanation = shipped.explain(encode(gradient_image(80, 70, seed=1), "PNG"), method=method)
    _check_map(explanation, 80, 70)
    assert set(prediction.probabilities) == set(shipped.card.classes)


def test_colour_maps_change_the_overlay_and_unknown_ones_are_refused():
    pixels = gradient_image(64, 48)
    heatmap = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    overlays = {name: overlay_heatmap(pixels, heatmap, 0.6, name) for name in COLORMAPS}
    assert all(o.shape == (48, 64, 3) for o in overlays.values())
    assert not np.array_equal(overlays["jet"], overlays["viridis"])
    assert not np.array_equal(overlays["viridis"], overlays["cividis"])
    # cividis has no red-green axis: its hot end is yellow, its cold end blue.
    hot, cold = overlay_heatmap(pixels * 0, heatmap, 1.0, "cividis")[0, -1], overlay_heatmap(
        pixels * 0, heatmap, 1.0, "cividis")[0, 0]
    assert hot[0] > 200 and hot[1] > 200 and cold[2] > cold[0]
    with pytest.raises(CovidscanError, match="Unknown colour map"):
        overlay_heatmap(pixels, heatmap, 0.5, "rainbow")


class CornerModel(torch.nn.Module):
    """A classifier whose COVID logit is the mean brightness of the top-left quarter, nothing else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half_h, half_w = x.shape[-2] // 2, x.shape[-1] // 2
        evidence = 4.0 * x[:, :, :half_h, :half_w].mean(dim=(1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def _corner_case(size: int = 48):
    image = torch.zeros(1, 3, size, size)
    image[:, :, : size // 2, : size // 2] = 1.0  # the evidence
    image += 0.05 * torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    y, x = np.mgrid[0:size, 0:size]
    # Hot at the top-left corner, smoothly colder away from it (no ties for the percentiles).
    pointing = np.exp(-((y - size / 4) ** 2 + (x - size / 4) ** 2) / (2 * (size / 4) ** 2)).astype(np.float32)
    pointing = (pointing - pointing.min()) / (pointing.max() - pointing.min())
    return image, pointing


def test_road_ranks_a_map_on_the_evidence_above_its_inverse():
    model = CornerModel().eval()
    image, pointing = _corner_case()
    good = road_faithfulness(model, image, pointing, class_index=0)
    inverse = road_faithfulness(model, image, 1.0 - pointing, class_index=0)
    assert good["score"] > 0.02 > -0.02 > inverse["score"]
    assert good["top20_drop"] > 0.0 and good["top20_drop"] > inverse["top20_drop"]
    assert set(good["morf"]) == set(good["lerf"]) == {"20", "40", "60", "80"}
    assert good["seconds"] >= 0.0
    # The imputation noise is seeded: the same map always gets the same score.
    assert road_faithfulness(model, image, pointing, class_index=0)["score"] == good["score"]
    assert "lowers the COVID score" in faithfulness_sentence(good, "COVID")
    assert "points away" in faithfulness_sentence(inverse, "COVID")


def test_explain_with_faithfulness_fills_the_record(predictor):
    image = encode(gradient_image(100, 100, seed=5), "PNG")
    _, explanation = predictor.explain(image, method="gradcam", faithfulness=True)
    road = explanation.faithfulness
    assert road["metric"] == "ROAD" and -1.0 <= road["score"] <= 1.0
    assert record_fields(explanation)["cam_faithfulness"] == road
    # Scoring a cached heatmap later gives the same number as scoring it during explain.
    again = predictor.faithfulness(image, explanation.heatmap, explanation.target_class)
    assert again["score"] == pytest.approx(road["score"], abs=0.05)
