"""Model bundles: a folder holding ``model.safetensors`` and ``card.json`` (the model card).

The card says everything needed to use the weights (architecture, classes, input size,
normalisation, DICOM window, threshold, temperature) and how they were made (data, command,
metrics and the split they were measured on). Loading checks the card against the weights (by
SHA-256 and by a strict state-dict load) and refuses anything else. Pickles are never trusted:
a ``.pt``/``.pth`` file is only read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidscan.errors import ModelBundleError, ModelRegistryError
from covidscan.utils import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

# Reading a card is torch-free (the ONNX Runtime path and `covidscan models` never import torch);
# torch and the model registry are imported where weights are read or written.

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
MODALITIES = ("CT", "X-ray")
# Stored precision of floating-point weights; half precision halves an ensemble's download and its
# effect on the outputs is far below the models' own variation (measured in the ensemble's card).
WEIGHTS_DTYPE_NAMES = ("float32", "float16")
# The registry's built-in architectures (covidscan.models), known here without importing torch; a
# test keeps the two in step. Any other name is looked up in the registry (plug-ins register there).
BUILTIN_ARCHITECTURES = ("densenet121", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1",
                         "efficientnet_lite2", "mobilenet_v2", "resnet18", "resnet34", "resnet50",
                         "tiny_cnn", "vgg16_bn", "vgg19_bn")


def __getattr__(name: str):
    if name == "WEIGHTS_DTYPES":  # {name: torch dtype}, built on first use so importing stays torch-free
        import torch

        return {"float32": torch.float32, "float16": torch.float16}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
MAX_ENSEMBLE_SIZE = 16


@dataclass
class ModelCard:
    """Everything needed to use a model, and how it was made."""

    name: str
    architecture: str
    classes: list[str]
    modality: str
    input_size: int
    mean: list[float]
    std: list[float]
    window: str | None = "lung"
    # What the input is cut to before resizing (covidscan.preprocessing.CROPS); None: the whole image.
    crop: str | None = None
    positive_class: str | None = None
    threshold: float | None = None
    temperature: float = 1.0
    description: str = ""
    ensemble_size: int = 1  # > 1: that many `architecture` models whose logits are averaged
    weights_dtype: str = "float32"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # The input gate (covidscan.gate): file, sha256, threshold, how it was fitted; empty = no gate.
    gate: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    created: str = ""
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_architecture(cls, name: str, architecture: str, classes: list[str], modality: str, **extra) -> "ModelCard":
        """A card whose input size and normalisation come from the architecture's registry entry."""
        from covidscan.models import get_spec

        config = get_spec(architecture).data_config()
        config.update({k: extra.pop(k) for k in list(extra) if k in config})
        return cls(name=name, architecture=architecture, classes=list(classes), modality=modality, **config, **extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dicom_window(self) -> str | None:
        """The window DICOM inputs are read with: the card's for CT (what the model was trained on),
        None for X-ray (its DICOMs keep their own VOI LUT / window)."""
        return self.window if self.modality == "CT" else None

    @property
    def architecture_label(self) -> str:
        """The architecture as people read it, e.g. ``mobilenet_v2`` or ``ensemble of 3 mobilenet_v2``."""
        return self.architecture if self.ensemble_size == 1 else f"ensemble of {self.ensemble_size} {self.architecture}"

    @classmethod
    def from_dict(cls, data: Any) -> "ModelCard":
        """Build and validate a card from parsed JSON; raises ModelBundleError with what is wrong."""
        if not isinstance(data, dict):
            raise ModelBundleError("The model card is not a JSON object.")
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("name", "architecture", "classes", "modality", "input_size", "mean", "std")
                   if name not in data]
        if missing:
            raise ModelBundleError(f"The model card lacks required fields: {', '.join(missing)}.")
        card = cls(**{k: v for k, v in data.items() if k in known})
        card.validate()
        return card

    def validate(self) -> None:
        """Raise ModelBundleError if any field is out of range."""
        from covidscan.preprocessing import CROPS

        problems = _architecture_problems(self.architecture)
        if (not isinstance(self.classes, list) or len(self.classes) < 2
                or not all(isinstance(c, str) and c for c in self.classes) or len(set(self.classes)) != len(self.classes)):
            problems.append("'classes' must list at least two distinct class names.")
        if self.modality not in MODALITIES:
            problems.append(f"'modality' must be one of {', '.join(MODALITIES)}, not {self.modality!r}.")
        if not isinstance(self.input_size, int) or not 16 <= self.input_size <= 2048:
            problems.append("'input_size' must be a whole number of pixels between 16 and 2048.")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                problems.append(f"'{key}' must be a list of three numbers.")
        if any(isinstance(v, (int, float)) and v <= 0 for v in (self.std if isinstance(self.std, list) else [])):
            problems.append("'std' values must be positive.")
        if self.crop is not None and (self.crop not in CROPS or self.modality != "CT"):
            problems.append(f"'crop' must be null or, for a CT model, one of {', '.join(CROPS)}; not {self.crop!r}.")
        if self.positive_class is not None and self.positive_class not in (self.classes or []):
            problems.append(f"'positive_class' {self.positive_class!r} is not one of the classes.")
        if self.threshold is not None and (self.positive_class is None or not 0 < float(self.threshold) < 1):
            problems.append("'threshold' needs a 'positive_class' and must lie strictly between 0 and 1.")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            problems.append("'temperature' must be a positive number.")
        if (not isinstance(self.ensemble_size, int) or isinstance(self.ensemble_size, bool)
                or not 1 <= self.ensemble_size <= MAX_ENSEMBLE_SIZE):
            problems.append(f"'ensemble_size' must be a whole number from 1 to {MAX_ENSEMBLE_SIZE}.")
        if self.weights_dtype not in WEIGHTS_DTYPE_NAMES:
            problems.append(f"'weights_dtype' must be one of {', '.join(WEIGHTS_DTYPE_NAMES)}.")
        if problems:
            raise ModelBundleError("The model card is invalid: " + " ".join(problems))


def _architecture_problems(name: Any) -> list[str]:
    import sys

    if isinstance(name, str) and name in BUILTIN_ARCHITECTURES and "covidscan.models" not in sys.modules:
        return []
    from covidscan.models import get_spec

    try:
        get_spec(name)
    except ModelRegistryError as exc:
        return [str(exc)]
    return []


@dataclass
class Bundle:
    """A loaded model (in eval mode) with its card and where it came from."""

    model: nn.Module
    card: ModelCard
    path: Path
    gate: Any = None  # covidscan.gate.InputGate, or None when the bundle has none


def round_to_stored(model: "nn.Module", weights_dtype: str) -> "nn.Module":
    """Round ``model``'s floating weights and buffers in place to ``weights_dtype`` and back to float32:
    exactly what :func:`save_bundle` stores and loading gives back (float16 -> float32 is exact)."""
    return model.to(__getattr__("WEIGHTS_DTYPES")[weights_dtype]).float()


def save_bundle(model: nn.Module, card: ModelCard, path: str | os.PathLike) -> Path:
    """Write ``model`` and ``card`` as a bundle folder, atomically.

    The bundle is assembled in a temporary folder beside ``path`` and renamed into place, so a
    crash never leaves a half-written bundle under ``path``.

    Returns:
        The bundle's path.
    """
    from safetensors.torch import save_file

    from covidscan import __version__

    card.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        dtype = __getattr__("WEIGHTS_DTYPES")[card.weights_dtype]
        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous().clone()
                 for k, v in model.state_dict().items()}
        weights_path = staging / WEIGHTS_FILE
        save_file(state, str(weights_path))
        card.weights_file = WEIGHTS_FILE
        card.weights_sha256 = sha256_file(weights_path)
        card.package_version = __version__
        card.created = card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        card.format_version = FORMAT_VERSION
        # A gate belongs to the weights it was fitted on: re-saved weights need a new one (covidscan.gate).
        card.gate = {}
        (staging / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
        # mkdtemp makes a private (0700) folder; a bundle is meant to be shared like any model file.
        os.chmod(staging, 0o755)
        for item in staging.iterdir():
            os.chmod(item, 0o644)
        _fsync_dir(staging)
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Load and validate a bundle.

    Args:
        path: a bundle folder (``card.json`` + ``model.safetensors`` or ``model.pt``), its
            ``card.json``, or a ``.pt``/``.pth`` checkpoint holding ``{"card": ..., "state_dict": ...}``.
        device: where to put the model.

    Returns:
        The model in eval mode with its card.

    Raises:
        ModelBundleError: the bundle is missing, malformed, unsafe, or does not match its card.
    """
    path = Path(path)
    if not path.exists():
        raise ModelBundleError(f"No model bundle at {path}.")
    if path.is_file() and path.name == CARD_FILE:
        path = path.parent
    if path.is_file():
        if path.suffix.lower() not in (".pt", ".pth"):
            raise ModelBundleError(
                f"{path.name} is not a model bundle: give a bundle folder (card.json + model.safetensors) "
                f"or a .pt/.pth checkpoint."
            )
        checkpoint = _torch_load_safely(path)
        if not isinstance(checkpoint, dict) or "card" not in checkpoint or "state_dict" not in checkpoint:
            raise ModelBundleError(f"{path.name} holds weights but no model card ('card' and 'state_dict' keys).")
        raw_card = checkpoint["card"]
        card = ModelCard.from_dict(json.loads(raw_card) if isinstance(raw_card, str) else raw_card)
        state = checkpoint["state_dict"]
    else:
        card = read_card(path)
        weights_path = path / card.weights_file
        if Path(card.weights_file).name != card.weights_file or not weights_path.is_file():
            raise ModelBundleError(f"The bundle {path} has no weights file '{card.weights_file}'.")
        if card.weights_sha256 and sha256_file(weights_path) != card.weights_sha256:
            raise ModelBundleError(
                f"The weights in {path} do not match the model card (checksum differs): the bundle is "
                "damaged or was changed after it was saved."
            )
        state = _read_weights(weights_path)
    model = _model_from_state(card, state)
    model.to(device).eval()
    gate = None
    if path.is_dir() and card.gate:
        from covidscan.gate import feature_layers, load_gate

        gate = load_gate(path, card.gate)
        heads = feature_layers(model)
        feature_layers(model, gate.tap_names)  # the taps must name layers of this model
        if len(gate.members) != len(heads) or any(layer.in_features != gate.feature_dim for layer in heads):
            raise ModelBundleError(f"The input gate in {path} does not fit the model (members or feature size differ).")
    return Bundle(model=model, card=card, path=path, gate=gate)


def read_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate just the card of a bundle folder (cheap: no weights are loaded)."""
    path = Path(path)
    card_path = path / CARD_FILE if path.is_dir() else path
    if not card_path.is_file():
        raise ModelBundleError(f"{path} is not a model bundle: it has no {CARD_FILE}.")
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelBundleError(f"The model card {card_path} is not valid JSON ({exc}).") from None
    return ModelCard.from_dict(data)


def _read_weights(weights_path: Path) -> dict[str, "torch.Tensor"]:
    if weights_path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelBundleError(f"The weights file {weights_path.name} is damaged ({exc}).") from None
    if weights_path.suffix.lower() in (".pt", ".pth"):
        return _torch_load_safely(weights_path)
    raise ModelBundleError(f"Unsupported weights file type: {weights_path.name}.")


def _torch_load_safely(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            raise ModelBundleError(
                f"{path.name} was refused: it contains Python objects or code, not just weights. "
                "Only plain weights are loaded (safetensors, or a .pt file of tensors)."
            ) from None
        raise ModelBundleError(f"{path.name} is not a readable PyTorch weights file.") from None


def _model_from_state(card: ModelCard, state: Any) -> "nn.Module":
    import torch

    from covidscan.models import create_ensemble, create_model

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelBundleError("The weights are not a mapping of tensor names to tensors.")
    if card.ensemble_size > 1:
        model = create_ensemble(card.architecture, len(card.classes), card.ensemble_size)
    else:
        model = create_model(card.architecture, num_classes=len(card.classes), pretrained=False)
    try:
        # Half-precision weights are widened to the model's float32 parameters by the copy.
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelBundleError(
            f"The weights do not match the model card ({card.architecture_label}, {len(card.classes)} classes): "
            + " ".join(line.strip() for line in first)
        ) from None
    return model


def _fsync_dir(folder: Path) -> None:
    for item in folder.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is swapped out, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
