"""The one fit loop: epochs of optimiser steps with mixed precision, a non-finite-loss check and a stop check.

Everything else a run does per step or per epoch (progress and ETA, the metrics file, the best
checkpoint, early stopping, learning-rate schedules, freezing) is a :class:`Callback`, as in MONAI's
handlers or fastai's callbacks, so the loop itself has no branches for them. Supervised training
(:mod:`covidscan.training.trainer`) and contrastive pretraining (:mod:`covidscan.pretrain`) both run it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from covidscan.errors import TrainingError


class Cancelled(Exception):
    """Raised inside the loop when a stop was requested (stop event set, e.g. by SIGTERM)."""


class NonFiniteLoss(TrainingError):
    """The loss became infinite or NaN."""


class Callback:
    """Hooks the :class:`FitLoop` calls; override the ones you need. ``loop`` is the running FitLoop."""

    def on_fit_start(self, loop: FitLoop) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, loop: FitLoop) -> None:
        """Before the first step of ``loop.epoch``."""

    def on_step_end(self, loop: FitLoop) -> None:
        """After an optimiser step (``loop.step``, ``loop.batch_index``, ``loop.last_loss`` are set)."""

    def on_train_epoch_end(self, loop: FitLoop) -> None:
        """After the last step of ``loop.epoch``, before its evaluation."""

    def on_epoch_end(self, loop: FitLoop) -> None:
        """After the last step of ``loop.epoch``, with ``loop.logs`` from the evaluation."""


@dataclass
class FitLoop:
    """Runs ``epochs`` epochs of at most ``steps_per_epoch`` steps.

    Attributes:
        model: the module being trained (put in train mode at every epoch start).
        optimiser: its optimiser.
        forward: batch -> (outputs, targets, number of samples); runs under bf16 autocast on a GPU.
        criterion: (outputs as float32, targets) -> the loss, computed in full precision.
        batches: epoch -> an iterable of batches.
        evaluate: epoch -> a dict of epoch results (``loop.logs``), e.g. validation metrics.
        stop_event: checked before every step; set -> :class:`Cancelled`.
        non_finite_message: the message of the NonFiniteLoss (a TrainingError) raised when the loss becomes infinite or NaN.
        callbacks: called in order at every hook.
        should_stop: a callback sets it to end training after the current epoch (early stopping).
    """

    model: nn.Module
    optimiser: torch.optim.Optimizer
    forward: Callable[[Any], tuple[torch.Tensor, Any, int]]
    criterion: Callable[[torch.Tensor, Any], torch.Tensor]
    batches: Callable[[int], Iterable[Any]]
    epochs: int
    steps_per_epoch: int
    device: torch.device
    stop_event: threading.Event = field(default_factory=threading.Event)
    evaluate: Callable[[int], dict] | None = None
    callbacks: Sequence[Callback] = ()
    non_finite_message: str = "The training loss became infinite or NaN: lower the learning rate."
    epoch: int = 0
    step: int = 0
    batch_index: int = 0
    last_loss: float = 0.0
    epoch_loss: float = 0.0  # mean loss over the epoch's samples so far
    epoch_samples: int = 0
    logs: dict = field(default_factory=dict)
    should_stop: bool = False
    epoch_started: float = 0.0  # time.monotonic() at the epoch's start
    train_seconds: float = 0.0  # the epoch's steps, without the evaluation

    @property
    def use_amp(self) -> bool:
        """bf16 autocast on a GPU; full precision on the CPU."""
        return self.device.type == "cuda"

    def check_stop(self) -> None:
        """Raise :class:`Cancelled` when a stop was requested."""
        if self.stop_event.is_set():
            raise Cancelled()

    def autocast(self):
        """The mixed-precision context for forward passes (also for code outside the loop)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def run(self) -> None:
        """Train; returns when every epoch ran or a callback set ``should_stop``."""
        self._call("on_fit_start")
        for epoch in range(1, self.epochs + 1):
            self.epoch = epoch
            self.epoch_started = time.monotonic()
            self.model.train()
            self._call("on_epoch_start")
            self.run_epoch()
            self.check_stop()
            self.train_seconds = time.monotonic() - self.epoch_started
            self._call("on_train_epoch_end")
            self.logs = self.evaluate(epoch) if self.evaluate is not None else {}
            self._call("on_epoch_end")
            if self.should_stop:
                break

    def run_epoch(self) -> None:
        """One pass over ``batches(epoch)``, capped at ``steps_per_epoch`` steps."""
        total, seen = 0.0, 0
        self.epoch_loss, self.epoch_samples = 0.0, 0
        for batch_index, batch in enumerate(self.batches(self.epoch)):
            if batch_index >= self.steps_per_epoch:
                break
            self.check_stop()
            with self.autocast():
                outputs, targets, count = self.forward(batch)
            loss = self.criterion(outputs.float(), targets)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(self.non_finite_message)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            self.step += 1
            self.batch_index = batch_index
            self.last_loss = loss.item()
            total += self.last_loss * count
            seen += count
            self.epoch_loss, self.epoch_samples = total / max(seen, 1), seen
            self._call("on_step_end")

    def _call(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self)
