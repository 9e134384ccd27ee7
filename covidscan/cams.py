"""Class-activation-map methods (one registry), overlay colour maps, and ROAD faithfulness.

The registry :data:`CAM_METHODS` is what the CLI, the app, the PDF report and the REST API read:
a method's key, its pytorch-grad-cam class, its display name, one plain line on what it shows, and
what it costs. Faithfulness is pytorch-grad-cam's ROAD (Rong et al. 2022, "A Consistent and
Efficient Evaluation Strategy for Attribution Methods"): hide the map's hottest (or coldest)
pixels by noisy linear imputation and see how much the explained class's probability moves.

Importing this module is cheap (no torch): the app's first render reads the registry.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from covidscan.errors import CovidscanError

if TYPE_CHECKING:  # heavy modules stay out of the import path of the app's first render
    import torch


@dataclass(frozen=True)
class CamMethod:
    """One CAM method as the user sees it.

    Attributes:
        key: the name on the command line and in records (``"gradcam"``).
        class_name: the pytorch-grad-cam class (``"GradCAM"``).
        display: the name shown to people (``"Grad-CAM"``).
        description: one plain line on what the map shows.
        cost: what one map costs, in words.
        uses_gradients: False for the gradient-free methods (a backward pass is never run).
        options: keyword arguments for the class (batch sizes of the many-forward methods).
    """

    key: str
    class_name: str
    display: str
    description: str
    cost: str
    uses_gradients: bool = True
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def slow(self) -> bool:
        """True for the methods that run the model once per channel of the target layer."""
        return not self.uses_gradients and self.key != "eigencam"

    def member_by_member(self, networks: int) -> bool:
        """Whether a map over ``networks`` networks (an ensemble's members) is taken member by member
        (:func:`member_mean_cam`): for the slow methods of an ensemble of several, members times fewer passes."""
        return self.slow and networks > 1

    def forward_passes(self, target_layers: Sequence) -> int:
        """How many forward passes of a network one map costs (an ensemble's: of its members, summed).

        Args:
            target_layers: the layers the map is taken from (an ensemble's: one per member).

        Returns:
            For the gradient methods and EigenCAM, one pass of every network. For the per-feature-map
            methods, each network once plus once per feature map of its target layer (see
            :func:`member_mean_cam`), and an ensemble once more for its prediction.
        """
        networks = len(target_layers)
        if not self.slow:
            return networks
        unablated = 1 if self.key == "ablationcam" else 0  # AblationCAM scores each layer once as it is
        maps = sum(1 + feature_maps(layer) + unablated for layer in target_layers)
        return maps + (networks if self.member_by_member(networks) else 0)

    def build(self, model, target_layers: Sequence) -> Any:
        """A pytorch-grad-cam object of this method over ``model`` and its ``target_layers``."""
        import pytorch_grad_cam

        cls = getattr(pytorch_grad_cam, self.class_name)
        options = dict(self.options)
        # ScoreCAM takes its batch size as an attribute, not a constructor argument.
        attributes = {"batch_size": options.pop("batch_size")} if self.key == "scorecam" else {}
        cam = cls(model=model, target_layers=list(target_layers), **options)
        for name, value in attributes.items():
            setattr(cam, name, value)
        return cam


_FAST = "one forward and a short backward pass (fast)"
_PER_FEATURE_MAP = "one forward pass per feature map (slow: minutes per image on a CPU)"
CAM_METHODS: dict[str, CamMethod] = {method.key: method for method in (
    CamMethod("gradcam", "GradCAM", "Grad-CAM",
              "Where the features that raise the class score are, weighting each feature map by its average gradient.",
              _FAST),
    CamMethod("gradcam++", "GradCAMPlusPlus", "Grad-CAM++",
              "Like Grad-CAM, but gives more weight to every separate region of evidence, not only the strongest one.",
              _FAST),
    CamMethod("hirescam", "HiResCAM", "HiResCAM",
              "Gradient times activation at each location: follows the model's computation more closely than Grad-CAM.",
              _FAST),
    CamMethod("xgradcam", "XGradCAM", "XGrad-CAM",
              "Grad-CAM with gradients normalised by the activations, so the map scales with the score.",
              _FAST),
    CamMethod("layercam", "LayerCAM", "LayerCAM",
              "Keeps only positive gradients at each location: sharper, finer-grained maps.",
              _FAST),
    CamMethod("eigencam", "EigenCAM", "EigenCAM",
              "The main pattern of the features, whatever the class: shows what the model attends to, not why.",
              "one forward pass, no gradients (fast)", uses_gradients=False),
    CamMethod("scorecam", "ScoreCAM", "Score-CAM",
              "Masks the image with each feature map and measures the class score: gradient-free and often cleaner.",
              _PER_FEATURE_MAP, uses_gradients=False,
              options=(("batch_size", 64),)),
    CamMethod("ablationcam", "AblationCAM", "Ablation-CAM",
              "Switches off each feature map and measures how much the class score drops: gradient-free.",
              _PER_FEATURE_MAP, uses_gradients=False,
              options=(("batch_size", 64),)),
)}
CAM_METHOD_NAMES: dict[str, str] = {key: method.display for key, method in CAM_METHODS.items()}

# Overlay colour maps (OpenCV colour-map names). viridis and cividis are perceptually uniform and
# readable with colour-vision deficiency; cividis is designed for it. jet is the familiar default.
COLORMAPS: dict[str, str] = {
    "jet": "Jet (classic)",
    "viridis": "Viridis (colour-blind safe)",
    "cividis": "Cividis (colour-blind safe)",
    "inferno": "Inferno",
}

# ROAD: the percentiles of the map at which pixels are hidden. Percentile p hides 100 - p percent
# of the image (the hottest for MoRF, the coldest for LeRF); 80 is "hide the hottest 20%".
ROAD_PERCENTILES: tuple[int, ...] = (20, 40, 60, 80)


def cam_method(key: str) -> CamMethod:
    """The registry entry for ``key``.

    Raises:
        CovidscanError: for an unknown method, naming the known ones.
    """
    try:
        return CAM_METHODS[key]
    except KeyError:
        raise CovidscanError(f"Unknown CAM method '{key}'. Choose one of: {', '.join(CAM_METHODS)}.") from None


def member_mean_cam(method: CamMethod, members: Sequence, target_layers: Sequence, input_tensor: "torch.Tensor",
                    targets: Sequence | None) -> np.ndarray:
    """An ensemble's map as the mean of its members' own maps, each member scored alone, rescaled to [0, 1].

    pytorch-grad-cam given the whole ensemble and every member's layer runs all the members for each
    member's feature maps. For the per-feature-map methods that is members x feature maps passes of
    the ensemble; member by member it is one pass of one member per feature map, members times fewer.
    The maps are combined as pytorch-grad-cam combines target layers (mean, then scaled to [0, 1]).

    Args:
        method: the CAM method.
        members: the ensemble's networks; ``target_layers`` holds one layer of each, in order.
        input_tensor: the input batch.
        targets: one target per image (e.g. the ensemble's predicted class), or None for each member's own.

    Returns:
        (batch, height, width) maps in [0, 1] at the input's size.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    maps = []
    for member, layer in zip(members, target_layers):
        with method.build(member, [layer]) as cam:
            maps.append(cam(input_tensor=input_tensor, targets=targets))
    return scale_cam_image(np.mean(maps, axis=0))


def feature_maps(layer) -> int:
    """The number of feature maps (channels) a target layer puts out: its last convolution's or
    normalisation's width."""
    width = 0
    for module in layer.modules():
        width = getattr(module, "num_features", None) or getattr(module, "out_channels", None) or width
    if not width:
        raise CovidscanError(f"Cannot tell how many feature maps {type(layer).__name__} puts out.")
    return int(width)


def colormap_code(name: str) -> int:
    """The OpenCV colour-map constant for one of :data:`COLORMAPS`.

    Raises:
        CovidscanError: for an unknown colour map.
    """
    import cv2

    if name not in COLORMAPS:
        raise CovidscanError(f"Unknown colour map '{name}'. Choose one of: {', '.join(COLORMAPS)}.")
    return getattr(cv2, f"COLORMAP_{name.upper()}")


class ProbabilityTarget:
    """A pytorch-grad-cam target: the temperature-scaled softmax probability of one class.

    ROAD scores in probability units read plainly ("lowers the COVID score by 0.31").
    """

    def __init__(self, index: int, temperature: float = 1.0) -> None:
        self.index = index
        self.temperature = float(temperature)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.softmax(output.float() / self.temperature, dim=-1)[..., self.index]


def road_faithfulness(
    model,
    input_tensor: torch.Tensor,
    heatmap: np.ndarray,
    class_index: int,
    temperature: float = 1.0,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    seed: int = 0,
) -> dict[str, Any]:
    """ROAD faithfulness of one map: how much hiding its hottest pixels hurts the class, and hiding its
    coldest pixels does not.

    For each percentile p, MoRF(p) hides the hottest (100 - p)% of pixels and LeRF(p) the coldest
    (100 - p)%, each by noisy linear imputation (no sharp edges for the model to notice); each
    value is the change in the class probability. The combined score is the mean of
    (LeRF - MoRF) / 2: positive when the map points at what the model uses, about 0 for a random
    map, negative for a map that points away from the evidence.

    Args:
        model: the classifier (eval mode); called under ``torch.no_grad``.
        input_tensor: the preprocessed image, 1 x C x H x W, on the model's device.
        heatmap: the map at the input's size (H x W, [0, 1]).
        class_index: the class explained.
        temperature: the card's calibration temperature (probabilities as the app shows them).
        percentiles: where to cut the map.
        seed: the imputation noise's seed (the same map always gets the same score).

    Returns:
        ``{"metric": "ROAD", "score", "percentiles", "morf", "lerf", "top20_drop", "seconds"}``:
        ``morf``/``lerf`` map each percentile to the probability change; ``top20_drop`` is how much
        hiding the hottest 20% lowers the class probability (None without percentile 80).
    """
    import torch
    from pytorch_grad_cam.metrics.road import (
        ROADLeastRelevantFirst,
        ROADMostRelevantFirst,
    )

    started = time.perf_counter()
    cams = np.asarray(heatmap, dtype=np.float32)[None]
    targets = [ProbabilityTarget(class_index, temperature)]
    morf: dict[int, float] = {}
    lerf: dict[int, float] = {}
    # The imputer draws its noise from torch's global generator: fork it, so a score is reproducible
    # and the caller's random state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in percentiles:
            morf[int(p)] = float(ROADMostRelevantFirst(percentile=p)(input_tensor, cams, targets, model)[0])
            lerf[int(p)] = float(ROADLeastRelevantFirst(percentile=p)(input_tensor, cams, targets, model)[0])
    score = float(np.mean([(lerf[p] - morf[p]) / 2 for p in morf]))
    return {
        "metric": "ROAD",
        "score": score,
        "percentiles": [int(p) for p in percentiles],
        "morf": {str(p): v for p, v in morf.items()},
        "lerf": {str(p): v for p, v in lerf.items()},
        "top20_drop": -morf[80] if 80 in morf else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def cam_cost_sentence(method: str, forward_passes: int, members: int = 1) -> str:
    """What one map of ``method`` costs with a model, in words, from its :meth:`CamMethod.forward_passes`.

    Args:
        method: a key of :data:`CAM_METHODS`.
        forward_passes: the model's network passes per map.
        members: the model's ensemble size.
    """
    spec = cam_method(method)
    networks = f"this model's {members} networks" if members > 1 else "this model"
    if not spec.slow:
        return f"{spec.display} runs {networks} once per image."
    return (f"{spec.display} runs {networks} {forward_passes:,} times per image (once per feature map): minutes "
            f"per image on a CPU. Grad-CAM runs {'each' if members > 1 else 'it'} once.")


def faithfulness_sentence(faithfulness: dict[str, Any] | None, target_class: str) -> str | None:
    """One plain sentence reading a ROAD result, or None when there is none."""
    if not faithfulness:
        return None
    drop = faithfulness.get("top20_drop")
    score = faithfulness.get("score")
    verdict = ("the map points at what the model uses" if score is not None and score > 0.02 else
               "the map points away from what the model uses" if score is not None and score < -0.02 else
               "the map tells little about what the model uses")
    if drop is None:
        return f"ROAD faithfulness {score:+.3f}: {verdict}."
    direction = "lowers" if drop >= 0 else "raises"
    return (f"Hiding the hottest 20% of the image {direction} the {target_class} score by {abs(drop):.2f} "
            f"(ROAD faithfulness {score:+.3f}: {verdict}).")


def record_fields(explanation: Any | None) -> dict[str, Any]:
    """The explanation's keys for a predict record (null without an explanation).

    Args:
        explanation: a :class:`covidscan.predictor.Explanation`, or None when no CAM was asked for.

    Returns:
        ``{"cam_method", "cam_faithfulness", "cam_in_lungs"}`` (``cam_in_lungs`` rounded to 4 places).
    """
    if explanation is None:
        return {"cam_method": None, "cam_faithfulness": None, "cam_in_lungs": None}
    share = explanation.in_lungs
    return {
        "cam_method": explanation.method,
        "cam_faithfulness": explanation.faithfulness,
        "cam_in_lungs": None if share is None else round(float(share), 4),
    }
