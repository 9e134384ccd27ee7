"""Leslie Smith's learning-rate range test, over the same data, model and loss setup as training."""
from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidscan.training.config import TrainConfig
from covidscan.training.data import augmentation
from covidscan.training.loop import Callback, Cancelled, FitLoop, NonFiniteLoss
from covidscan.training.trainer import Trainer
from covidscan.utils import seed_everything


@dataclass
class LRFinderResult:
    """The range test's curve and suggestion."""

    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float | None


class _Diverged(Exception):
    """The loss became non-finite or exploded: the curve ends here."""


class RangeTest(Callback):
    """Sets an exponentially rising lr before every step and records the debiased smoothed loss."""

    def __init__(self, start_lr: float, end_lr: float, num_steps: int) -> None:
        self.start_lr = start_lr
        self.num_steps = num_steps
        self.factor = (end_lr / start_lr) ** (1 / max(num_steps - 1, 1))
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed, self.best = 0.0, math.inf

    def lr(self, step: int) -> float:
        return self.start_lr * self.factor**step

    def set_lr(self, optimiser: torch.optim.Optimizer, step: int) -> None:
        for group in optimiser.param_groups:
            group["lr"] = self.lr(step)

    def on_fit_start(self, loop: FitLoop) -> None:
        self.set_lr(loop.optimiser, 0)

    def on_step_end(self, loop: FitLoop) -> None:
        index = loop.step - 1
        self.smoothed = 0.9 * self.smoothed + 0.1 * loop.last_loss
        debiased = self.smoothed / (1 - 0.9 ** (index + 1))
        self.lrs.append(self.lr(index))
        self.losses.append(debiased)
        self.best = min(self.best, debiased)
        if loop.step >= self.num_steps or (debiased > 4 * self.best and loop.step > 5):
            raise _Diverged()  # done (or diverged): end the test at once
        self.set_lr(loop.optimiser, loop.step)


def find_lr(config: TrainConfig, start_lr: float = 1e-6, end_lr: float = 1.0, num_steps: int = 60,
            stop_event: threading.Event | None = None) -> LRFinderResult:
    """Leslie Smith's LR range test: raise the lr exponentially and record the smoothed loss.

    Args:
        config: the training options (data, model, batch size, augmentation at the last size).
        start_lr, end_lr: the range.
        num_steps: optimiser steps (epochs over the training set are repeated as needed).
        stop_event: set it to stop early; the curve so far is returned.

    Returns:
        The curve (lrs, smoothed losses) and the suggested lr: where the loss falls fastest
        (or a tenth of the lr at the minimum loss when the curve is flat).
    """
    config = copy.deepcopy(config)
    config.validate()
    trainer = Trainer(config, Path("."), None, stop_event or threading.Event())
    seed_everything(config.seed)
    trainer.load_data()
    trainer.build_model()
    trainer.prefix = None  # the range test runs the whole model on images (a frozen prefix stays frozen)
    trainer.train_set.transform = augmentation(config.augment, trainer.sizes[-1], trainer.cache_size,
                                                config.random_erasing)
    optimiser = torch.optim.AdamW(trainer.model.parameters(), lr=start_lr, weight_decay=config.weight_decay)
    test = RangeTest(start_lr, end_lr, num_steps)
    steps_per_epoch = max(1, len(trainer.batches(0)))
    loop = FitLoop(trainer.model, optimiser, trainer.forward, trainer.criterion, trainer.batches,
                   math.ceil(num_steps / steps_per_epoch), steps_per_epoch, trainer.device, trainer.stop_event,
                   callbacks=[test])
    try:
        loop.run()
    except (_Diverged, Cancelled, NonFiniteLoss):  # a non-finite loss ends the curve; it does not fail the test
        pass
    return LRFinderResult(test.lrs, test.losses, suggest_lr(test.lrs, test.losses))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The lr of the steepest loss descent before the minimum (a tenth of the minimum's lr as fallback)."""
    if len(lrs) < 3:
        return None
    losses_a = np.asarray(losses)
    log_lrs = np.log10(np.asarray(lrs))
    minimum = int(np.argmin(losses_a))
    if minimum < 2:
        return float(lrs[minimum]) / 10
    # Skip the first tenth: the debiased moving average still wobbles there, and a wobble on a tiny lr
    # interval looks like the steepest descent of the whole curve.
    skip = min(max(1, len(lrs) // 10), minimum - 1)
    slopes = np.gradient(losses_a[: minimum + 1], log_lrs[: minimum + 1])[skip:]
    steepest = skip + int(np.argmin(slopes))
    return float(lrs[steepest]) if slopes[steepest - skip] < 0 else float(lrs[minimum]) / 10
