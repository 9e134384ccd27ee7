"""The one fit loop and its callbacks on a tiny linear problem: steps, early stopping, stop and non-finite checks."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from covidscan.training import Callback, Cancelled, FitLoop, NonFiniteLoss
from covidscan.training.callbacks import BestCheckpoint, EarlyStopping, TailAverage, WeightEMA


def make_loop(scores: list[float], stop: threading.Event | None = None, inputs_scale: float = 1.0,
              callbacks=(), evaluate=None, hidden: nn.Module | None = None) -> FitLoop:
    """A loop over a 2 -> 2 linear model; ``hidden``: a layer of width 2 between two such linear layers."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2) if hidden is None else nn.Sequential(nn.Linear(2, 2), hidden, nn.Linear(2, 2))
    x = torch.randn(8, 2) * inputs_scale
    y = (x[:, 0] > 0).long()
    batches = [(x[:4], y[:4]), (x[4:], y[4:]), (x, y)]  # the third is beyond steps_per_epoch
    return FitLoop(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   forward=lambda batch: (model(batch[0]), batch[1], len(batch[1])),
                   criterion=nn.functional.cross_entropy, batches=lambda epoch: batches, epochs=len(scores),
                   steps_per_epoch=2, device=torch.device("cpu"), stop_event=stop or threading.Event(),
                   evaluate=evaluate or (lambda epoch: {"val_auc": scores[epoch - 1], "val_loss": 1.0, "size": 32}),
                   callbacks=callbacks)


def test_steps_and_early_stopping_on_the_monitored_metric():
    checkpoint = BestCheckpoint("val_auc")
    loop = make_loop([0.5, 0.7, 0.6, 0.65, 0.9], callbacks=[checkpoint, EarlyStopping(checkpoint, patience=2)])
    loop.run()
    assert loop.epoch == 4 and loop.step == 8  # two steps per epoch; stopped after two epochs without a new best
    assert checkpoint.best_epoch == 2 and checkpoint.best_metric == 0.7 and checkpoint.best_size == 32
    assert set(checkpoint.best_state) == {"weight", "bias"}
    assert loop.epoch_samples == 8 and loop.epoch_loss > 0


def test_monitor_last_keeps_the_final_epoch_whatever_val_says():
    checkpoint = BestCheckpoint("last")
    loop = make_loop([0.9, 0.5, 0.4], callbacks=[checkpoint])
    loop.run()
    assert checkpoint.best_epoch == 3 and checkpoint.best_metric is None
    torch.testing.assert_close(checkpoint.best_state["weight"], loop.model.weight.detach())


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


def test_weight_ema_is_what_is_evaluated_and_kept_while_training_continues_from_the_raw_weights():
    decay = 0.5
    raw_after_step, evaluated, trained_from = [], [], []

    class Record(Callback):
        def on_epoch_start(self, loop):
            trained_from.append(loop.model.weight.detach().clone())

        def on_step_end(self, loop):
            raw_after_step.append(loop.model.weight.detach().clone())

    checkpoint = BestCheckpoint("val_auc")
    scores = [0.9, 0.5, 0.4]  # the first epoch stays the best
    loop = None

    def evaluate(epoch):
        evaluated.append(loop.model.weight.detach().clone())
        return {"val_auc": scores[epoch - 1], "val_loss": 1.0, "size": 32}

    loop = make_loop(scores, callbacks=[WeightEMA(decay), Record(), checkpoint], evaluate=evaluate)
    loop.run()
    expected, average = [], None
    for weight in raw_after_step:
        average = weight if average is None else decay * average + (1 - decay) * weight
        expected.append(average)
    for epoch in range(3):  # two steps per epoch: each evaluation saw the average after its last step
        torch.testing.assert_close(evaluated[epoch], expected[2 * epoch + 1])
    torch.testing.assert_close(checkpoint.best_state["weight"], expected[1])
    # The second and third epochs trained on from the raw weights, not from the average.
    torch.testing.assert_close(trained_from[1], raw_after_step[1])
    torch.testing.assert_close(trained_from[2], raw_after_step[3])
    assert not torch.allclose(raw_after_step[1], expected[1])


def test_tail_average_keeps_the_mean_of_the_last_epochs_snapshots_and_evaluates_it_at_the_end():
    snapshots, evaluated = [], []

    class Record(Callback):
        def on_train_epoch_end(self, loop):
            snapshots.append(loop.model.weight.detach().clone())

    checkpoint = BestCheckpoint("last")
    loop = None

    def evaluate(epoch):
        evaluated.append(loop.model.weight.detach().clone())
        return {"val_auc": 0.5, "val_loss": 1.0, "size": 32}

    # Record runs before the average, so it sees each epoch's own weights.
    loop = make_loop([0.5] * 5, callbacks=[Record(), TailAverage(3), checkpoint], evaluate=evaluate)
    loop.run()
    mean_of_last_three = torch.stack(snapshots[2:]).mean(0)
    torch.testing.assert_close(evaluated[4], mean_of_last_three)
    torch.testing.assert_close(checkpoint.best_state["weight"], mean_of_last_three)
    for epoch in range(4):  # the epochs before the last evaluate their own weights
        torch.testing.assert_close(evaluated[epoch], snapshots[epoch])
    assert not torch.allclose(mean_of_last_three, snapshots[4])


class RunningMeans(Callback):
    """Records the hidden batch-norm layer's running mean after every epoch's training."""

    def __init__(self) -> None:
        self.means = []

    def on_train_epoch_end(self, loop):
        self.means.append(loop.model[1].running_mean.clone())


def test_tail_average_of_a_batch_norm_model_averages_its_running_statistics():
    record = RunningMeans()
    means = record.means
    loop = make_loop([0.5] * 4, callbacks=[record, TailAverage(2)], hidden=nn.BatchNorm1d(2))
    loop.run()
    assert not torch.allclose(means[2], means[3])  # the two snapshots differ, so their mean is a real average
    torch.testing.assert_close(loop.model[1].running_mean, (means[2] + means[3]) / 2)
    assert int(loop.model[1].num_batches_tracked) > 0


def test_tail_average_takes_the_per_tensor_path_that_integer_buffers_allow(monkeypatch):
    # On a GPU torch averages with a foreach kernel that refuses the integer num_batches_tracked
    # (a CUDA run of the shipped CT recipe failed there). Declaring the CPU a foreach device puts this
    # CPU run on that same branch: the average must not take it.
    import torch.optim.swa_utils as swa_utils

    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu"])
    record = RunningMeans()
    means = record.means
    loop = make_loop([0.5] * 3, callbacks=[record, TailAverage(2)], hidden=nn.BatchNorm1d(2))
    loop.run()
    torch.testing.assert_close(loop.model[1].running_mean, (means[1] + means[2]) / 2)
