"""Preprocessing shared by training and prediction, driven by the model card's data config."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from covidscan.preprocessing import resize_square  # noqa: F401 - re-exported


def normalize(batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """N x 3 x H x W uint8 tensor -> float32, scaled to [0, 1] and normalised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
    scale_t = 1.0 / (torch.tensor(std, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0)
    return (batch_uint8.float() - mean_t) * scale_t


def model_input(batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                device: torch.device) -> torch.Tensor:
    """A uint8 batch on ``device``, normalised; channels-last on a GPU, where its kernels are faster."""
    batch = normalize(batch_uint8.to(device), mean, std)
    if device.type == "cuda":
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 array -> 3 x H x W uint8 tensor (no copy of the pixel values' type)."""
    pixels = np.ascontiguousarray(pixels)
    if not pixels.flags.writeable:  # e.g. a view of an immutable decoded buffer; torch wants writable memory
        pixels = pixels.copy()
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def preprocess(images: Sequence[np.ndarray], input_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Stack RGB uint8 images into a normalised N x 3 x S x S float batch."""
    batch = torch.stack([to_tensor(resize_square(image, input_size)) for image in images])
    return normalize(batch, mean, std)
