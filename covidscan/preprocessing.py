"""Torch-free preprocessing (numpy + OpenCV): what :mod:`covidscan.transforms` does, as arrays.

The ONNX Runtime path of prediction uses it so that classifying never imports PyTorch; the
arithmetic is the same as :func:`covidscan.transforms.normalize` (float32 ``(x - 255 mean) / (255 std)``).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

#: What a model's input is cut to before resizing (the card's ``crop``): "lungs" is the bounding box of
#: the automatic lung mask (:func:`covidscan.lungs.lung_mask`, CT only), so the figure margins, captions
#: and table around a slice, which differ by source, do not reach the model.
CROPS = ("lungs",)
# The lung box grows by this share of its size on each side (the pleura and chest wall stay in view).
_LUNG_BOX_MARGIN = 0.08
# A lung mask below this share of the image is a failed segmentation: the whole image is kept.
_MIN_LUNG_SHARE = 0.02


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize an H x W x 3 uint8 image to ``size`` x ``size`` (area filter when shrinking)."""
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    interpolation = cv2.INTER_AREA if min(height, width) > size else cv2.INTER_LINEAR
    return cv2.resize(pixels, (size, size), interpolation=interpolation)


def crop_box(pixels: np.ndarray, crop: str | None, mask: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """The region of an image a model with this ``crop`` sees, as (top, bottom, left, right) pixels.

    Args:
        pixels: the image as displayed, H x W x 3 (or H x W) uint8.
        crop: the model card's ``crop``: None (the whole image) or one of :data:`CROPS`.
        mask: the image's lung mask when the caller has it already (the "lungs" crop computes it otherwise).

    Returns:
        The box (bottom and right exclusive), or None for the whole image, which is also what a
        failed lung segmentation (under 2% of the image) gives.
    """
    if crop is None:
        return None
    if crop != "lungs":
        raise ValueError(f"Unknown crop {crop!r}: expected one of {', '.join(CROPS)}.")
    if mask is None:
        from covidscan.lungs import lung_mask

        mask = lung_mask(pixels)
    return lung_box(mask)


def lung_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The "lungs" crop's box from a lung mask (see :func:`crop_box`)."""
    if mask.sum() < _MIN_LUNG_SHARE * mask.size:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    grow_y, grow_x = int(_LUNG_BOX_MARGIN * (bottom - top)), int(_LUNG_BOX_MARGIN * (right - left))
    return max(0, top - grow_y), min(height, bottom + grow_y), max(0, left - grow_x), min(width, right + grow_x)


def cut(pixels: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """``pixels`` (an image or a map of it) inside ``box``; all of it for None."""
    if box is None:
        return pixels
    top, bottom, left, right = box
    return pixels[top:bottom, left:right]


def model_view(pixels: np.ndarray, crop: str | None) -> np.ndarray:
    """The part of an image a model with this ``crop`` sees (see :func:`crop_box`), before resizing."""
    return cut(pixels, crop_box(pixels, crop))


def preprocess_array(images: Sequence[np.ndarray], input_size: int, mean: Sequence[float],
                     std: Sequence[float], crop: str | None = None) -> np.ndarray:
    """Stack RGB uint8 images into a normalised N x 3 x S x S float32 array.

    Args:
        images: H x W x 3 uint8 arrays (any size; each is resized to ``input_size``).
        input_size: the model's square input side.
        mean, std: per-channel normalisation on the [0, 1] scale (the model card's).
        crop: the model card's ``crop`` (:func:`model_view`), applied before resizing.

    Returns:
        The model's input batch.
    """
    batch = np.stack([resize_square(model_view(np.asarray(image), crop), input_size)
                      for image in images]).transpose(0, 3, 1, 2)
    mean_255 = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    scale = (np.float32(1.0) / (np.asarray(std, dtype=np.float32) * np.float32(255.0))).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((batch.astype(np.float32) - mean_255) * scale)
