"""Training data: decoded images cached in memory as uint8 tensors, augmentation presets, loaders."""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidscan.errors import TrainingError
from covidscan.utils import log


class CachedImages(torch.utils.data.Dataset):
    """Decoded, resized uint8 images held in memory, augmented per sample on the fly."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def augmentation(preset: str, size: int, cached_size: int,
                 erasing: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Per-image transform (uint8 3 x H x W in and out) for an augmentation preset.

    Args:
        preset: none, light or strong (see TrainConfig.augment).
        size: the training size of this epoch.
        cached_size: the size the training images are cached at.
        erasing: probability of random erasing: a rectangle of 2-33% of the image set to black (air
            on a CT slice), so the model cannot lean on one region alone. 0: off.
    """
    from torchvision.transforms import v2

    if preset == "none":
        steps = [] if size == cached_size else [v2.Resize((size, size), antialias=True)]
    elif preset == "light":
        steps = [v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                 v2.RandomHorizontalFlip()]
    else:
        steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
                 v2.RandomHorizontalFlip(),
                 v2.RandomApply([v2.RandomRotation(10)], p=0.5),
                 v2.ColorJitter(brightness=0.3, contrast=0.3)]
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, scale=(0.02, 0.33), value=0))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


def batch_mixer(mode: str, alpha: float, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """(images, labels) -> (mixed images, soft labels) for a batch-mixing mode; None for "none".

    torchvision's MixUp / CutMix draw the weight from Beta(alpha, alpha) and pair each image with the
    batch rolled by one; the soft labels (N x classes) go straight into the cross-entropy loss.
    """
    from torchvision.transforms import v2

    if mode == "none":
        return None
    mixup, cutmix = v2.MixUp(alpha=alpha, num_classes=num_classes), v2.CutMix(alpha=alpha, num_classes=num_classes)
    return {"mixup": mixup, "cutmix": cutmix, "mixup-cutmix": v2.RandomChoice([mixup, cutmix])}[mode]


def train_loader(dataset: CachedImages, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                 class_counts: np.ndarray | None = None, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A seeded, shuffled loader for one epoch; with ``class_counts``, a class-balancing sampler instead.

    The last ragged batch is dropped (unless the set is smaller than one batch).
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    sampler = None
    if class_counts is not None:
        per_item = (1.0 / class_counts)[dataset.labels.numpy()]
        sampler = torch.utils.data.WeightedRandomSampler(per_item.tolist(), len(per_item), generator=generator)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        num_workers=num_workers, drop_last=len(dataset) > batch_size, pin_memory=pin_memory,
        persistent_workers=False, worker_init_fn=_seed_worker if num_workers else None,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_positive_class(classes: Sequence[str]) -> str | None:
    """The COVID class when there is one (e.g. COVID, Covid, COVID-19)."""
    for name in classes:
        if name.lower().startswith("covid"):
            return name
    return None


def load_matching_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Copy tensors of a safetensors state dict whose names and shapes match ``model``; returns how many."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise TrainingError(f"No weights file at {path} to start from.")
    state = load_file(str(path))
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise TrainingError(f"None of the weights in {path.name} fit a {type(model).__name__}.")
    model.load_state_dict(matched, strict=False)
    log(f"Initialised {len(matched)}/{len(own)} tensors from {path.name}")
    return len(matched)
