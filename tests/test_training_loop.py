"""The one fit loop and its callbacks on a tiny linear problem: steps, early stopping, stop and non-finite checks."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from covidscan.training import Callback, Cancelled, FitLoop, NonFiniteLoss
from covidscan.training.callbacks import BestCheckpoint, EarlyStopping


def make_loop(scores: list[float], stop: threading.Event | None = None, inputs_scale: float = 1.0,
              callbacks=()) -> FitLoop:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x = torch.randn(8, 2) * inputs_scale
    y = (x[:, 0] > 0).long()
    batches = [(x[:4], y[:4]), (x[4:], y[4:]), (x, y)]  # the third is beyond steps_per_epoch
    return FitLoop(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   forward=lambda batch: (model(batch[0]), batch[1], len(batch[1])),
                   criterion=nn.functional.cross_entropy, batches=lambda epoch: batches, epochs=len(scores),
                   steps_per_epoch=2, device=torch.device("cpu"), stop_event=stop or threading.Event(),
                   evaluate=lambda epoch: {"val_auc": scores[epoch - 1], "val_loss": 1.0, "size": 32},
                   callbacks=callbacks)


def test_steps_and_early_stopping_on_the_monitored_metric():
    checkpoint = BestCheckpoint("val_auc")
    loop = make_loop([0.5, 0.7, 0.6, 0.65, 0.9], callbacks=[checkpoint, EarlyStopping(checkpoint, patience=2)])
    loop.run()
    assert loop.epoch == 4 and loop.step == 8  # two steps per epoch; stopped after two epochs without a new best
    assert checkpoint.best_epoch == 2 and checkpoint.best_metric == 0.7 and checkpoint.best_size == 32
    assert set(checkpoint.best_state) == {"weight", "bias"}
    assert loop.epoch_samples == 8 and loop.epoch_loss > 0


def test_stop_event_cancels_before_the_next_step():
    stop = threading.Event()

    class StopAfterFirstStep(Callback):
        def on_step_end(self, loop):
            stop.set()

    loop = make_loop([0.5, 0.6], stop=stop, callbacks=[StopAfterFirstStep()])
    with pytest.raises(Cancelled):
        loop.run()
    assert loop.step == 1


def test_non_finite_loss_is_a_training_error():
    loop = make_loop([0.5], inputs_scale=float("nan"))
    with pytest.raises(NonFiniteLoss, match="infinite or NaN"):
        loop.run()
    assert loop.step == 0
