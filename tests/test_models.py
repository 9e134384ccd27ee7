"""Tests for the model registry: every architecture builds, classifies and explains a tiny input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.errors import ModelRegistryError
from covidscan.models import create_model, get_spec, list_architectures, pretrained_available, target_layer

SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weights"
REQUIRED = {"resnet18", "resnet34", "resnet50", "densenet121", "vgg16_bn", "vgg19_bn", "mobilenet_v2", "efficientnet_b0"}


def test_registry_lists_the_required_architectures():
    assert REQUIRED <= set(list_architectures())
    for name in list_architectures():
        config = get_spec(name).data_config()
        assert config["input_size"] >= 32 and len(config["mean"]) == 3 and len(config["std"]) == 3


@pytest.mark.parametrize("name", sorted(REQUIRED | {"tiny_cnn"}))
@pytest.mark.parametrize("cam_name", ["GradCAM", "GradCAMPlusPlus"])
def test_forward_and_grad_cam(name, cam_name):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    cam_class = getattr(pytorch_grad_cam, cam_name)
    # Works on the model as built: DenseNet's in-place ReLU must not break the gradient hook.
    with cam_class(model=model, target_layers=[target_layer(model, name)]) as cam:
        heatmaps = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    assert heatmaps.shape == (2, 64, 64)
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_unknown_architecture_and_bad_class_count():
    with pytest.raises(ModelRegistryError, match="Unknown architecture 'alexnet'.*resnet18"):
        create_model("alexnet", 2)
    with pytest.raises(ModelRegistryError, match="at least 2 classes"):
        create_model("resnet18", 1)
    with pytest.raises(ModelRegistryError, match="no ImageNet weights"):
        create_model("tiny_cnn", 2, pretrained=True)


def test_pretrained_weights_missing_offline_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not pretrained_available("resnet18")

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelRegistryError) as info:
        create_model("resnet18", 2, pretrained=True)
    message = str(info.value)
    assert "not available" in message and "resnet18-f37072fd.pth" in message and "pretrained off" in message
    assert "Errno" not in message


def test_pretrained_from_offline_cache(tmp_path, monkeypatch):
    checkpoint = SHARED_WEIGHTS / "mobilenet_v2-b0353104.pth"
    if not checkpoint.is_file():
        pytest.skip("../shared/data/weights is not available")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "hub" / "checkpoints" / checkpoint.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert pretrained_available("mobilenet_v2")
    model = create_model("mobilenet_v2", 2, pretrained=True)
    reference = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.features[0][0].weight, reference["features.0.0.weight"])
    assert model.classifier[-1].out_features == 2


# ------------------------------------------------------------------ architecture facts: head and frozen prefix
@pytest.mark.parametrize("arch", ["tiny_cnn", "mobilenet_v2", "efficientnet_b0"])
def test_split_prefix_recomposes_the_model(arch):
    from covidscan.models import get_head, split_prefix

    model = create_model(arch, 2).eval()
    prefix, rest = split_prefix(model, arch, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        recomposed = get_head(model, arch)(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(rest(prefix(x)), 1), 1))
        assert torch.allclose(recomposed, model(x), atol=1e-5)


def test_split_prefix_refuses_unsupported_architectures_and_bad_block_counts():
    from covidscan.errors import ModelRegistryError
    from covidscan.models import split_prefix

    with pytest.raises(ModelRegistryError, match="not supported for resnet18; use efficientnet_b0, efficientnet_lite0, .*mobilenet_v2"):
        split_prefix(create_model("resnet18", 2), "resnet18", 2)
    with pytest.raises(ModelRegistryError, match="frozen blocks must lie between 1 and 6, not 7"):
        split_prefix(create_model("tiny_cnn", 2), "tiny_cnn", 7)


@pytest.mark.parametrize("arch, head, group", [("resnet18", "fc", "fc"), ("vgg16_bn", "classifier.6", "classifier"),
                                                ("mobilenet_v2", "classifier", "classifier")])
def test_head_facts_and_replace_head(arch, head, group):
    from covidscan.models import get_head, get_module, head_parameters, replace_head

    model = create_model(arch, 3)
    assert get_head(model, arch) is get_module(model, head)
    assert {id(p) for p in head_parameters(model, arch)} == {id(p) for p in get_module(model, group).parameters()}
    replacement = torch.nn.Identity()
    replace_head(model, arch, replacement)
    assert get_head(model, arch) is replacement
