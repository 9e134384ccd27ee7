"""Predictor: load a bundle once, classify images, explain them with a CAM method (covidscan.cams).

Grad-CAM comes from pytorch-grad-cam. The class probabilities of an explained image come from the
same forward pass the CAM uses, so explaining costs one forward and a short backward, not two
forwards. Classification runs on an inference engine (:mod:`covidscan.engine`): ONNX Runtime
when asked for and its export is cached, PyTorch otherwise; with a cached ONNX export the torch
model is loaded only on the first explanation, so classifying never imports PyTorch.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from covidscan import cams, lungs
from covidscan import gate as input_gate
from covidscan.bundle import CARD_FILE, Bundle, ModelCard, load_bundle, read_card
from covidscan.engine import ForwardResult, TorchEngine, onnx_or_none, resolve_engine, softmax
from covidscan.errors import CovidscanError
from covidscan.images import ImageInfo, ImageSource, LoadedImage, read_image
from covidscan.preprocessing import crop_box, cut, preprocess_array

if TYPE_CHECKING:
    import torch

CAM_METHODS = tuple(cams.CAM_METHODS)  # the keys of the registry in covidscan.cams
_UNREAD = object()  # the input gate is read on first use
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
    """A class-activation map at the original image's size, and a ready overlay.

    ``in_lungs`` is the share of the map's mass inside the automatic lung mask (CT only; None for
    X-rays or when no lung is found); ``faithfulness`` is the ROAD result of
    :func:`covidscan.cams.road_faithfulness` when it was asked for.
    """

    method: str
    target_class: str
    heatmap: np.ndarray  # float32, H x W, values in [0, 1]
    overlay: np.ndarray  # uint8, H x W x 3, RGB
    faithfulness: dict | None = None
    in_lungs: float | None = None
    lung_mask: np.ndarray | None = None  # bool, H x W (CT only)
    warnings: list[str] = field(default_factory=list)


def _heatmap_on_image(heatmap: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int] | None) -> np.ndarray:
    """A heatmap of the model's input laid on the image it came from (H x W, values in [0, 1]): resized
    to the image, or to the crop ``box`` the model saw, with 0 outside it."""
    height, width = shape
    if box is None:
        placed = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    else:
        top, bottom, left, right = box
        placed = np.zeros((height, width), dtype=np.float32)
        placed[top:bottom, left:right] = cv2.resize(heatmap.astype(np.float32), (right - left, bottom - top),
                                                    interpolation=cv2.INTER_LINEAR)
    return np.clip(placed, 0.0, 1.0)


def overlay_heatmap(pixels: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4, colormap: str = "jet",
                    outline: np.ndarray | None = None) -> np.ndarray:
    """Blend a [0, 1] heatmap over an RGB uint8 image of the same height and width.

    Args:
        colormap: one of :data:`covidscan.cams.COLORMAPS` (viridis and cividis are colour-blind safe).
        outline: a boolean mask (e.g. the lung fields) whose outline is drawn on top, or None.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if heatmap.shape != pixels.shape[:2]:
        heatmap = cv2.resize(heatmap, (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_LINEAR)
    opacity = float(min(max(opacity, 0.0), 1.0))
    blended = show_cam_on_image(pixels.astype(np.float32) / 255.0, heatmap, use_rgb=True,
                                colormap=cams.colormap_code(colormap), image_weight=1.0 - opacity)
    return blended if outline is None else lungs.draw_outline(blended, outline)


class Predictor:
    """Classify and explain images with one model bundle.

    Thread-safe: one Predictor may serve many app sessions. Calls on the model are serialised,
    because Grad-CAM's hooks on the shared model would otherwise mix two images' activations.

    Args:
        bundle: a loaded :class:`Bundle` or the path of one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        engine: the forward pass of :meth:`predict`: ``"torch"``, or ``"auto"``/``"onnx"`` for ONNX
            Runtime (exported once per bundle, checked against torch, torch when that fails).
            ``$COVIDSCAN_ENGINE`` overrides it.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, device: str = "cpu", engine: str = "torch") -> None:
        self._model_lock = threading.RLock()
        self._bundle: Bundle | None = bundle if isinstance(bundle, Bundle) else None
        self._bundle_source = None if isinstance(bundle, Bundle) else bundle
        self._device_name = device
        self._torch_device = None
        self._target_layers = None
        self._gate = _UNREAD
        self.engine_name = resolve_engine(engine)
        folder = self._bundle_folder(bundle)
        if self._bundle is None and (self.engine_name == "torch" or folder is None):
            self._load_torch()
        # A bundle folder's card is read without torch; the bundle itself is validated on export.
        self.card: ModelCard = self._bundle.card if self._bundle is not None else read_card(folder)
        self.classes: list[str] = list(self.card.classes)
        self.engine = None
        if self.engine_name != "torch" and folder is not None:
            self.engine = onnx_or_none(self.card, folder, self._device_name.replace("auto", "cpu"),
                                       lambda: self.model)
        if self.engine is None:
            self.engine = TorchEngine(self.model, self.device, input_gate.gate_taps(self.card.gate))

    # ------------------------------------------------------------------ the torch model (loaded when needed)
    @staticmethod
    def _bundle_folder(bundle) -> Path | None:
        path = Path(bundle.path) if isinstance(bundle, Bundle) else Path(bundle)
        if path.is_file() and path.name == CARD_FILE:
            path = path.parent
        return path if (path / CARD_FILE).is_file() else None

    def _load_torch(self) -> Bundle:
        with self._model_lock:
            if self._torch_device is None:
                import torch

                device = self._device_name
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                self._torch_device = torch.device(device)
            if self._bundle is None:
                self._bundle = load_bundle(self._bundle_source, device=self._torch_device)
            if self._target_layers is None:
                from covidscan.models import target_layers

                self._bundle.model.to(self._torch_device).eval()
                self._target_layers = target_layers(self._bundle.model, self._bundle.card.architecture)
                self._prepare_for_cam()
            return self._bundle

    @property
    def bundle(self) -> Bundle:
        """The loaded bundle (loads the torch model on first use)."""
        return self._load_torch()

    @property
    def model(self):
        """The torch model, in eval mode (loaded on first use)."""
        return self._load_torch().model

    @property
    def device(self) -> "torch.device":
        """The torch device of :attr:`model`."""
        self._load_torch()
        return self._torch_device

    # ------------------------------------------------------------------ inputs
    def load(self, source: ImageSource | LoadedImage, window=None) -> LoadedImage:
        """Read an input; DICOM files use ``window`` or else the model card's window."""
        if isinstance(source, LoadedImage):
            return source
        return read_image(source, window=window if window is not None else self._default_window())

    def _default_window(self):
        return self.card.dicom_window

    # ------------------------------------------------------------------ prediction
    def predict(self, images: Sequence[ImageSource | LoadedImage], window=None) -> list[Prediction]:
        """Classify a batch of images (paths, bytes or already loaded images).

        Raises:
            ImageReadError: if any input cannot be read (read inputs one by one to carry on past it).
        """
        loaded = [self.load(image, window) for image in images]
        if not loaded:
            return []
        result = self.forward(loaded)
        return self._predictions(result.logits, [image.info for image in loaded], result.member_logits,
                                 result.features)

    def forward(self, images: Sequence[LoadedImage]) -> ForwardResult:
        """One engine forward pass over loaded images: logits and each member's penultimate features."""
        batch = preprocess_array([image.pixels for image in images], self.card.input_size, self.card.mean,
                                 self.card.std, crop=self.card.crop)
        if self.engine.name != "torch":  # an ONNX Runtime session runs concurrent calls safely
            return self.engine.forward(batch)
        with self._model_lock:  # the torch model's hooks (Grad-CAM, features) are shared state
            return self.engine.forward(batch)

    def predict_one(self, image: ImageSource | LoadedImage, window=None) -> Prediction:
        """Classify one image."""
        return self.predict([image], window)[0]

    def cam_forward_passes(self, method: str) -> int:
        """How many network forward passes (an ensemble's members' summed) one ``method`` map costs with
        this model (loads the torch model); see :meth:`covidscan.cams.CamMethod.forward_passes`.

        Raises:
            CovidscanError: for an unknown method.
        """
        spec = cams.cam_method(method)
        self._load_torch()
        return spec.forward_passes(self._target_layers)

    def explain(
        self,
        image: ImageSource | LoadedImage,
        method: str = "gradcam",
        target_class: str | None = None,
        opacity: float = 0.4,
        window=None,
        faithfulness: bool = False,
        colormap: str = "jet",
        lung_outline: bool = False,
    ) -> tuple[Prediction, Explanation]:
        """Classify one image and compute its class-activation map.

        Args:
            image: a path, bytes, or loaded image.
            method: a key of :data:`covidscan.cams.CAM_METHODS` (``"gradcam"``, ``"scorecam"``...).
            target_class: the class to explain; the predicted label when None.
            opacity: heatmap opacity of the overlay.
            faithfulness: also score the map with ROAD (about a second or two more on a CPU).
            colormap: the overlay's colour map (:data:`covidscan.cams.COLORMAPS`).
            lung_outline: draw the lung mask's outline on the overlay (CT models).

        Returns:
            The prediction and the explanation (heatmap and overlay at the image's own size, the
            share of the map inside the lungs for CT, and the ROAD result when asked for).
        """
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        spec = cams.cam_method(method)
        cams.colormap_code(colormap)  # an unknown colour map fails before the (maybe slow) CAM
        loaded = self.load(image, window)
        mask = self.lung_mask(loaded)
        # The region the model sees (the card's crop); the map covers only it. The lung crop reuses the mask.
        box = crop_box(loaded.pixels, self.card.crop, mask)
        batch = self._batch(loaded, box)
        targets = None
        if target_class is not None:
            targets = [ClassifierOutputTarget(self._class_index(target_class))]
        member_by_member = spec.member_by_member(len(self._target_layers))  # one target layer per member
        with self._model_lock:
            with input_gate.capture_features(self.model, input_gate.gate_taps(self.card.gate)) as captured:
                if member_by_member:
                    with torch.no_grad():
                        logits = self.model(batch).float().cpu().numpy()
                else:
                    cam = spec.build(self.model, self._target_layers)
                    with cam:
                        heatmaps = cam(input_tensor=batch, targets=targets)
                        logits = cam.outputs.detach().float().cpu().numpy()
            if member_by_member:  # every member explains the ensemble's class, not its own
                targets = targets or [ClassifierOutputTarget(int(np.argmax(logits[0])))]
                heatmaps = cams.member_mean_cam(spec, self.model.members, self._target_layers, batch, targets)
        # Only each member's first captured pass is the image itself: CAM methods may run further forwards.
        prediction = self._predictions(logits, [loaded.info], [passes[0] for passes in captured["logits"]],
                                       [passes[0] for passes in captured["features"]])[0]
        explained = target_class if target_class is not None else self.classes[int(np.argmax(logits[0]))]
        heatmap = _heatmap_on_image(heatmaps[0], loaded.pixels.shape[:2], box)
        share = lungs.share_inside(heatmap, mask) if mask is not None else None
        warning = lungs.outside_lungs_warning(share)
        road = self._road(batch, heatmaps[0], explained) if faithfulness else None
        overlay = overlay_heatmap(loaded.pixels, heatmap, opacity, colormap,
                                  outline=mask if lung_outline and mask is not None else None)
        explanation = Explanation(method=method, target_class=explained, heatmap=heatmap, overlay=overlay,
                                  faithfulness=road, in_lungs=share, lung_mask=mask,
                                  warnings=[warning] if warning else [])
        return prediction, explanation

    def lung_mask(self, image: LoadedImage) -> np.ndarray | None:
        """The automatic lung mask of a CT slice (:func:`covidscan.lungs.lung_mask`); None for X-ray models.

        X-rays get none: there is no sound offline lung segmenter for projections (see covidscan.lungs).
        """
        if self.card.modality != "CT":
            return None
        return lungs.lung_mask(image.pixels)

    def faithfulness(self, image: ImageSource | LoadedImage, heatmap: np.ndarray, target_class: str,
                     window=None) -> dict:
        """ROAD faithfulness (:func:`covidscan.cams.road_faithfulness`) of a heatmap already computed.

        Args:
            image: the image the heatmap explains.
            heatmap: the map, at the image's size or the model's input size, values in [0, 1].
            target_class: the class the map explains.
        """
        loaded = self.load(image, window)
        size = self.card.input_size
        heatmap = np.asarray(heatmap, dtype=np.float32)
        box = crop_box(loaded.pixels, self.card.crop)
        if box is not None and heatmap.shape[:2] == loaded.pixels.shape[:2]:  # at the image's size: the model's region
            heatmap = cut(heatmap, box)
        small = cv2.resize(heatmap, (size, size), interpolation=cv2.INTER_LINEAR)
        return self._road(self._batch(loaded, box), small, target_class)

    def _road(self, batch: torch.Tensor, heatmap: np.ndarray, target_class: str) -> dict:
        with self._model_lock:
            return cams.road_faithfulness(self.model, batch, heatmap, self._class_index(target_class),
                                          temperature=float(self.card.temperature))

    # ------------------------------------------------------------------ helpers
    def _batch(self, image: LoadedImage, box: tuple[int, int, int, int] | None) -> "torch.Tensor":
        """The model's input for one image cut to ``box``: :func:`crop_box` of the card's crop, found once
        by the caller because the heatmap is placed back into the same box (None: the whole image)."""
        import torch

        batch = preprocess_array([cut(image.pixels, box)], self.card.input_size, self.card.mean, self.card.std)
        return torch.from_numpy(batch).to(self.device)

    def probabilities(self, logits) -> np.ndarray:
        """Softmax of temperature-scaled logits (the card's calibration temperature), as numpy."""
        if not isinstance(logits, np.ndarray):  # a torch tensor
            logits = logits.detach().float().cpu().numpy()
        return softmax(np.asarray(logits, dtype=np.float32) / float(self.card.temperature))

    def decide(self, probs: Sequence[float]) -> str:
        """The label for one image's probabilities, honouring the card's decision threshold."""
        from covidscan.decision import decide

        index = decide(np.asarray([probs]), self.classes, self.card.positive_class, self.card.threshold)[0]
        return self.classes[int(index)]

    def _predictions(self, logits: np.ndarray, infos: Sequence[ImageInfo | None], member_logits: Sequence[np.ndarray],
                     features: Sequence[np.ndarray]) -> list[Prediction]:
        """Predictions with OOD check and uncertainty, from one forward pass (N x C logits, and each
        member's own logits and penultimate features)."""
        probs = self.probabilities(logits)
        _, member_probs = input_gate.member_probabilities(member_logits, self.card.temperature)
        uncertainty = input_gate.prediction_uncertainty(probs, member_probs)
        gate = self.gate
        scores = gate.score(list(features)) if gate is not None else None
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
    def gate(self):
        """The bundle's input gate (:class:`covidscan.gate.InputGate`), None without one; read without torch."""
        if self._gate is _UNREAD:
            if self._bundle is not None:
                self._gate = self._bundle.gate
            else:
                folder = self._bundle_folder(self._bundle_source)
                self._gate = input_gate.load_gate(folder, self.card.gate) if folder is not None and self.card.gate else None
        return self._gate

    @property
    def uncertain_above(self) -> float:
        """The uncertainty above which a prediction is called uncertain (the card's, else 0.5)."""
        selective = (self.card.gate.get("uncertainty") or {}).get("selective") or {}
        return float(selective.get("uncertain_above", 0.5))

    def ood_check(self, info: ImageInfo | None, score: float | None) -> dict:
        """The ``ood`` record: a DICOM of another modality, or a gate score above its threshold, is flagged."""
        gate = self.gate
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

    def _prepare_for_cam(self) -> None:
        """Freeze the weights and start the graph at the target layer.

        Grad-CAM needs gradients only at the target layers' outputs, not for any weight. With the
        weights frozen, a forward hook marks each output as requiring grad (only when grad mode is
        on), so the backward pass covers just the layers after it (for an ensemble, in every member).
        """
        import torch

        for parameter in self._bundle.model.parameters():
            parameter.requires_grad_(False)

        def start_graph_here(_module, _inputs, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
                return output.detach().requires_grad_(True)
            return None

        for layer in self._target_layers:
            layer.register_forward_hook(start_graph_here)

