"""Predictor: load a bundle once, classify images, explain with Grad-CAM / Grad-CAM++.

Grad-CAM comes from pytorch-grad-cam. The class probabilities of an explained image come from the
same forward pass the CAM uses, so explaining costs one forward and a short backward, not two
forwards.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from covidscan.bundle import Bundle, ModelCard, load_bundle
from covidscan.errors import CovidscanError
from covidscan import gate as input_gate
from covidscan.images import ImageInfo, ImageSource, LoadedImage, read_image
from covidscan.models import target_layers
from covidscan.transforms import preprocess

CAM_METHODS = ("gradcam", "gradcam++")
# DICOM modalities that are X-ray projections (CR computed radiography, DX digital radiography).
_XRAY_MODALITIES = {"CR", "DX", "RG", "PX"}


@dataclass
class Prediction:
    """A model's answer for one image."""

    label: str
    probabilities: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    info: ImageInfo | None = None
    # Out of distribution: {"flagged", "score", "threshold", "reason"} (see covidscan.gate.ood_record).
    ood: dict = field(default_factory=lambda: input_gate.ood_record(False, None, None, input_gate.NO_GATE_REASON))
    uncertainty: float | None = None  # in [0, 1], higher = less sure (covidscan.gate.prediction_uncertainty)
    uncertain: bool = False  # uncertainty above the card's cut-off (the 20% least sure val predictions)

    @property
    def flagged(self) -> bool:
        """True when the image is outside what the model was trained on: the label is not an assessment."""
        return bool(self.ood.get("flagged"))

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": self.probabilities, "warnings": list(self.warnings),
                "ood": dict(self.ood), "uncertainty": self.uncertainty, "uncertain": self.uncertain}


@dataclass
class Explanation:
    """A class-activation map at the original image's size, and a ready overlay."""

    method: str
    target_class: str
    heatmap: np.ndarray  # float32, H x W, values in [0, 1]
    overlay: np.ndarray  # uint8, H x W x 3, RGB


def overlay_heatmap(pixels: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colours) over an RGB uint8 image of the same height and width."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if heatmap.shape != pixels.shape[:2]:
        heatmap = cv2.resize(heatmap, (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_LINEAR)
    opacity = float(min(max(opacity, 0.0), 1.0))
    return show_cam_on_image(pixels.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=1.0 - opacity)


class Predictor:
    """Classify and explain images with one model bundle.

    Thread-safe: one Predictor may serve many app sessions. Calls on the model are serialised,
    because Grad-CAM's hooks on the shared model would otherwise mix two images' activations.

    Args:
        bundle: a loaded :class:`Bundle` or the path of one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, device: str = "cpu") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=self.device)
        self.model = self.bundle.model.to(self.device).eval()
        self.card: ModelCard = self.bundle.card
        self.classes: list[str] = list(self.card.classes)
        self._target_layers = target_layers(self.model, self.card.architecture)
        self._model_lock = threading.RLock()
        self._prepare_for_cam()

    # ------------------------------------------------------------------ inputs
    def load(self, source: ImageSource | LoadedImage, window=None) -> LoadedImage:
        """Read an input; DICOM files use ``window`` or else the model card's window."""
        if isinstance(source, LoadedImage):
            return source
        return read_image(source, window=window if window is not None else self._default_window())

    def _default_window(self):
        # The card's window is what the model was trained with for CT; X-ray DICOMs keep their own.
        return self.card.window if self.card.modality == "CT" else None

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def predict(self, images: Sequence[ImageSource | LoadedImage], window=None) -> list[Prediction]:
        """Classify a batch of images (paths, bytes or already loaded images).

        Raises:
            ImageReadError: if any input cannot be read (read inputs one by one to carry on past it).
        """
        loaded = [self.load(image, window) for image in images]
        if not loaded:
            return []
        batch = self._batch(loaded)
        with self._model_lock, input_gate.capture_features(self.model) as captured:
            logits = self.model(batch)
        return self._predictions(logits, [image.info for image in loaded], captured)

    def predict_one(self, image: ImageSource | LoadedImage, window=None) -> Prediction:
        """Classify one image."""
        return self.predict([image], window)[0]

    def explain(
        self,
        image: ImageSource | LoadedImage,
        method: str = "gradcam",
        target_class: str | None = None,
        opacity: float = 0.4,
        window=None,
    ) -> tuple[Prediction, Explanation]:
        """Classify one image and compute its class-activation map.

        Args:
            image: a path, bytes, or loaded image.
            method: ``"gradcam"`` or ``"gradcam++"``.
            target_class: the class to explain; the predicted label when None.
            opacity: heatmap opacity of the overlay.

        Returns:
            The prediction and the explanation (heatmap and overlay at the image's own size).
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam_class = self._cam_class(method)
        loaded = self.load(image, window)
        batch = self._batch([loaded])
        targets = None
        if target_class is not None:
            targets = [ClassifierOutputTarget(self._class_index(target_class))]
        with (self._model_lock, input_gate.capture_features(self.model) as captured,
              cam_class(model=self.model, target_layers=self._target_layers) as cam):
            heatmaps = cam(input_tensor=batch, targets=targets)
            logits = cam.outputs.detach()
        prediction = self._predictions(logits, [loaded.info], captured)[0]
        explained = target_class if target_class is not None else self.classes[int(torch.argmax(logits[0]))]
        heatmap = cv2.resize(heatmaps[0].astype(np.float32), (loaded.info.width, loaded.info.height),
                             interpolation=cv2.INTER_LINEAR)
        heatmap = np.clip(heatmap, 0.0, 1.0)
        explanation = Explanation(method=method, target_class=explained, heatmap=heatmap,
                                  overlay=overlay_heatmap(loaded.pixels, heatmap, opacity))
        return prediction, explanation

    # ------------------------------------------------------------------ helpers
    def _batch(self, loaded: Sequence[LoadedImage]) -> torch.Tensor:
        batch = preprocess([image.pixels for image in loaded], self.card.input_size, self.card.mean, self.card.std)
        return batch.to(self.device)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of temperature-scaled logits (the card's calibration temperature)."""
        return torch.softmax(logits.float() / float(self.card.temperature), dim=-1)

    def decide(self, probs: Sequence[float]) -> str:
        """The label for one image's probabilities, honouring the card's decision threshold."""
        from covidscan.evaluation import decide

        index = decide(np.asarray([probs]), self.classes, self.card.positive_class, self.card.threshold)[0]
        return self.classes[int(index)]

    def _predictions(self, logits: torch.Tensor, infos: Sequence[ImageInfo | None], captured: dict) -> list[Prediction]:
        """Predictions with OOD check and uncertainty, from one forward pass and its captured features.

        Only each member's first captured pass is used: CAM methods may run further forwards.
        """
        probs = self.probabilities(logits).cpu().numpy()
        member_logits = [passes[0] for passes in captured["logits"]]
        _, member_probs = input_gate.member_probabilities(member_logits, self.card.temperature)
        uncertainty = input_gate.prediction_uncertainty(probs, member_probs)
        gate = self.bundle.gate
        scores = gate.score([passes[0] for passes in captured["features"]]) if gate is not None else None
        cutoff = self.uncertain_above
        predictions = []
        for i, (row, info) in enumerate(zip(probs.tolist(), infos)):
            score = None if scores is None else float(scores[i])
            predictions.append(Prediction(
                label=self.decide(row),
                probabilities={name: float(p) for name, p in zip(self.classes, row)},
                warnings=self.input_warnings(info),
                info=info,
                ood=self.ood_check(info, score),
                uncertainty=float(uncertainty[i]),
                uncertain=bool(uncertainty[i] > cutoff),
            ))
        return predictions

    @property
    def uncertain_above(self) -> float:
        """The uncertainty above which a prediction is called uncertain (the card's, else 0.5)."""
        selective = (self.card.gate.get("uncertainty") or {}).get("selective") or {}
        return float(selective.get("uncertain_above", 0.5))

    def ood_check(self, info: ImageInfo | None, score: float | None) -> dict:
        """The ``ood`` record: a DICOM of another modality, or a gate score above its threshold, is flagged."""
        gate = self.bundle.gate
        threshold = None if gate is None else gate.threshold
        wrong_modality = self._wrong_modality(info)
        if wrong_modality:
            return input_gate.ood_record(True, score, threshold, wrong_modality)
        if gate is None or score is None:
            return input_gate.ood_record(False, None, None, input_gate.NO_GATE_REASON)
        flagged = score > gate.threshold
        return input_gate.ood_record(flagged, score, threshold,
                                     input_gate.gate_reason(score, gate.threshold) if flagged else None)

    def _wrong_modality(self, info: ImageInfo | None) -> str | None:
        """Why a DICOM's own modality says the model cannot read it, or None."""
        modality = ((info.modality if info is not None else None) or "").upper()
        if not modality:
            return None
        expected = self.card.modality
        if (expected == "CT" and modality != "CT") or (expected == "X-ray" and modality not in _XRAY_MODALITIES):
            return (f"This DICOM's modality is {info.modality}, but the model was trained on {expected} images: "
                    "the result is not meaningful.")
        return None

    def input_warnings(self, info: ImageInfo | None) -> list[str]:
        """Reasons to doubt a prediction that the input itself gives."""
        if info is None:
            return []
        warnings: list[str] = []
        wrong_modality = self._wrong_modality(info)
        if wrong_modality:
            warnings.append(wrong_modality)
        if info.color == "color":
            warnings.append("The image is in colour; scans are grayscale. Is it a photo or an annotated figure?")
        if min(info.width, info.height) < self.card.input_size // 2:
            warnings.append(
                f"The image is small ({info.width}x{info.height}); the model works at "
                f"{self.card.input_size}x{self.card.input_size}, so detail is missing."
            )
        warnings.extend(info.notes)
        return warnings

    def _class_index(self, name: str) -> int:
        if name not in self.classes:
            raise CovidscanError(f"Unknown class '{name}'. This model's classes are: {', '.join(self.classes)}.")
        return self.classes.index(name)

    @staticmethod
    def _cam_class(method: str):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

        methods = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
        if method not in methods:
            raise CovidscanError(f"Unknown CAM method '{method}'. Choose one of: {', '.join(CAM_METHODS)}.")
        return methods[method]

    def _prepare_for_cam(self) -> None:
        """Freeze the weights and start the graph at the target layer.

        Grad-CAM needs gradients only at the target layers' outputs, not for any weight. With the
        weights frozen, a forward hook marks each output as requiring grad (only when grad mode is
        on), so the backward pass covers just the layers after it (for an ensemble, in every member).
        """
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

        def start_graph_here(_module, _inputs, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
                return output.detach().requires_grad_(True)
            return None

        for layer in self._target_layers:
            layer.register_forward_hook(start_graph_here)

