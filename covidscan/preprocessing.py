"""Torch-free preprocessing (numpy + OpenCV): what :mod:`covidscan.transforms` does, as arrays.

The ONNX Runtime path of prediction uses it so that classifying never imports PyTorch; the
arithmetic is the same as :func:`covidscan.transforms.normalize` (float32 ``(x - 255 mean) / (255 std)``).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize an H x W x 3 uint8 image to ``size`` x ``size`` (area filter when shrinking)."""
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    interpolation = cv2.INTER_AREA if min(height, width) > size else cv2.INTER_LINEAR
    return cv2.resize(pixels, (size, size), interpolation=interpolation)


def preprocess_array(images: Sequence[np.ndarray], input_size: int, mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
    """Stack RGB uint8 images into a normalised N x 3 x S x S float32 array.

    Args:
        images: H x W x 3 uint8 arrays (any size; each is resized to ``input_size``).
        input_size: the model's square input side.
        mean, std: per-channel normalisation on the [0, 1] scale (the model card's).

    Returns:
        The model's input batch.
    """
    batch = np.stack([resize_square(np.asarray(image), input_size) for image in images]).transpose(0, 3, 1, 2)
    mean_255 = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    scale = (np.float32(1.0) / (np.asarray(std, dtype=np.float32) * np.float32(255.0))).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((batch.astype(np.float32) - mean_255) * scale)
