"""Frozen-prefix (cached-feature) partial fine-tuning: CPU-friendly training of a network's tail.

The first ``blocks`` feature blocks (:func:`covidscan.models.split_prefix`) stay frozen; their
outputs are computed once for ``views`` augmented views of every training image and kept as
float16, and each epoch trains only the rest (blocks -> pool -> head) on one random view per image.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from covidscan.errors import ModelRegistryError, TrainingError
from covidscan.models import get_head, get_spec, split_prefix
from covidscan.training.data import augmentation
from covidscan.training.loop import Callback, Cancelled, FitLoop
from covidscan.transforms import model_input
from covidscan.utils import log


class FrozenPrefix(Callback):
    """A model split into a frozen, cached prefix and a trainable tail.

    Args:
        model: the full model (its prefix parameters get ``requires_grad=False``).
        arch: its architecture name.
        blocks: how many feature blocks to freeze.
        device: where the model is.
        stop_requested: returns True when the run should stop (checked between feature batches).
    """

    def __init__(self, model: nn.Module, arch: str, blocks: int, device: torch.device,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        try:
            self.prefix, self.rest = split_prefix(model, arch, blocks)
        except ModelRegistryError as exc:
            raise TrainingError(str(exc)) from None
        for parameter in self.prefix.parameters():
            parameter.requires_grad_(False)
        self.head = get_head(model, arch)
        self.spec = get_spec(arch)
        self.device = device
        self.stop_requested = stop_requested
        self.train_features: torch.Tensor | None = None  # views x N x C x H x W
        self.val_features: dict[int, torch.Tensor] = {}

    def parameters(self) -> list[nn.Parameter]:
        """The frozen prefix's parameters."""
        return list(self.prefix.parameters())

    def on_epoch_start(self, loop: FitLoop) -> None:
        self.prefix.eval()  # frozen: keep its batch-norm statistics

    def prepare(self, images_uint8: torch.Tensor, preset: str, size: int, cache_size: int, views: int, seed: int,
                report: Callable[[str], None] = lambda message: None, erasing: float = 0.0) -> None:
        """Run the prefix once over ``views`` views of each training image (view 0 plain, the others augmented)."""
        self.prefix.eval()
        transform = augmentation(preset, size, cache_size, erasing)
        plain = augmentation("none", size, cache_size)
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        started = time.monotonic()
        total = views * len(images_uint8)
        outputs = []
        for view in range(views):
            chosen = plain if (view == 0 or transform is None) else transform
            batch = torch.stack([chosen(image) if chosen else image for image in images_uint8])
            outputs.append(self.features(batch, report, done=view * len(batch), total=total))
            log(f"Frozen-prefix features: view {view + 1}/{views} ({time.monotonic() - started:.0f}s)")
        torch.set_rng_state(generator_state)
        self.train_features = torch.stack(outputs)

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor, report: Callable[[str], None] = lambda message: None,
                 done: int = 0, total: int = 0) -> torch.Tensor:
        """Prefix outputs (float16, on the CPU) of uint8 images, 32 at a time."""
        outputs = []
        for start in range(0, len(images_uint8), 32):
            if self.stop_requested():
                raise Cancelled()
            batch = model_input(images_uint8[start:start + 32], self.spec.mean, self.spec.std, self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                outputs.append(self.prefix(batch).to(torch.float16).cpu())
            if total:
                report(f"preparing features {done + start + len(batch)}/{total}")
        return torch.cat(outputs)

    def tail(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable rest of the network on prefix outputs (blocks -> pool -> head)."""
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.rest(features.to(self.device)), 1), 1)
        return self.head(pooled)

    def batches(self, epoch: int, labels: torch.Tensor, batch_size: int, seed: int,
                class_counts: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (or, with ``class_counts``, class-balanced) batches of cached features, one random view each."""
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        n = len(labels)
        if class_counts is not None:
            per_item = torch.as_tensor((1.0 / class_counts)[labels.numpy()])
            order = torch.multinomial(per_item, n, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
        views = torch.randint(0, self.train_features.shape[0], (n,), generator=generator)
        for start in range(0, n - batch_size + 1 if n > batch_size else 1, batch_size):
            index = order[start:start + batch_size]
            yield self.train_features[views[index], index], labels[index]

    def logits(self, model: nn.Module, images_uint8: torch.Tensor, size: int) -> torch.Tensor:
        """Logits of (validation) images, their prefix outputs computed once per size."""
        if size not in self.val_features:
            self.val_features[size] = self.features(images_uint8)
        model.eval()
        with torch.no_grad():
            return torch.cat([self.tail(chunk.float()).float().cpu() for chunk in self.val_features[size].split(64)])
